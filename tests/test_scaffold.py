"""`armlab init`: a commented experiment file whose columns come from the pool's own schema
(parquet footer, jsonl first record), valid as written, never over an existing file."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.scaffold import Column, suggest_columns
from armlab.spec import load_experiment
from data_util import make_pool


def armlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_parquet_pool_reads_only_the_footer(tmp_path: Path) -> None:
    (first, *_) = make_pool(tmp_path / "pool", n_docs=300, n_files=3)  # id, text, score, token_count, source
    # Wreck the first file's data pages and keep its footer: init must not read past the footer.
    raw = bytearray(first.read_bytes())
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    raw[4 : len(raw) - footer] = b"\xff" * (len(raw) - footer - 4)
    first.write_bytes(bytes(raw))
    r = armlab("init", "my exp.toml", "--from", str(tmp_path / "pool"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "my exp.toml").read_text()
    assert text.count("#") > 10  # commented
    exp = load_experiment(tmp_path / "my exp.toml")
    assert exp.name == "my-exp" and exp.pool.uri == str(tmp_path / "pool")
    assert (exp.pool.text_column, exp.pool.id_column, exp.pool.token_count_column) == ("text", "id", "token_count")
    assert [(a.kind, a.score_column) for a in exp.arms] == [("top", "score"), ("random", None)]
    assert exp.eval.docs == 300 // 20  # a small pool gets 5% of its documents as the eval set
    assert "source (string)" in text  # every column is listed for the user to pick from


def test_jsonl_pool_uses_the_first_record_and_other_names(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    pool.mkdir()
    rows = [
        {"doc_id": i, "url": f"https://x/{i}", "content": "word " * 50, "quality_prob": 0.5, "n_tokens": 50}
        for i in range(3)
    ]
    with gzip.open(pool / "part-0.jsonl.gz", "wt") as f:
        f.write("\n" + "".join(json.dumps(r) + "\n" for r in rows))
    r = armlab("init", "exp.toml", "--from", f"file://{pool}/*.jsonl.gz", cwd=tmp_path)  # the fsspec (remote) path
    assert r.returncode == 0, r.stderr
    exp = load_experiment(tmp_path / "exp.toml")
    assert (exp.pool.text_column, exp.pool.id_column, exp.pool.token_count_column) == ("content", "doc_id", "n_tokens")
    assert exp.arms[0].score_column == "quality_prob"


def test_suggestions_without_usual_names() -> None:
    cols = [Column("title", "string", "string", 1_000), Column("body_md", "string", "string", 90_000),
            Column("likes", "int", "int64"), Column("page_id", "string", "string", 500)]  # fmt: skip
    s = suggest_columns(cols)
    assert (s.text, s.id, s.score, s.token_count) == ("body_md", "page_id", None, None)  # the bulk of the bytes


def test_no_score_column_gives_a_random_arm_and_a_commented_top_arm(tmp_path: Path) -> None:
    make_pool(tmp_path / "pool", n_docs=50, n_files=1, with_score=False, with_id=False)
    assert armlab("init", "exp.toml", "--from", str(tmp_path / "pool"), cwd=tmp_path).returncode == 0
    exp = load_experiment(tmp_path / "exp.toml")
    assert [a.kind for a in exp.arms] == ["random"] and exp.pool.id_column is None
    assert "# score_column" in (tmp_path / "exp.toml").read_text()


def test_template_without_a_pool_and_refuses_to_overwrite(tmp_path: Path) -> None:
    assert armlab("init", cwd=tmp_path).returncode == 0
    before = (tmp_path / "experiment.toml").read_bytes()
    assert load_experiment(tmp_path / "experiment.toml").pool.uri.startswith("hf://datasets/")
    r = armlab("init", "--from", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "armlab: error: experiment.toml: already exists; choose another file name (init never overwrites)"
    ]
    assert (tmp_path / "experiment.toml").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment.toml"]  # no temp file left


def test_bad_pool_is_one_line(tmp_path: Path) -> None:
    r = armlab("init", "exp.toml", "--from", str(tmp_path / "nothing-here"), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no parquet or jsonl" in r.stderr
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "nums.parquet")
    assert armlab("init", "exp.toml", "--from", str(tmp_path / "nums.parquet"), cwd=tmp_path).returncode == 0
    assert "FIXME" in (tmp_path / "exp.toml").read_text()  # no string column: says so where it matters
