"""`armlab check`, prebuilt arms (local dirs) and `armlab plan`, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.data.check import check_data_dir
from armlab.data.shards import read_shards
from data_util import experiment_toml, make_pool, make_texts
from test_data_prepare import assert_refused, cli


def playbook_dir(d: Path, n_files: int = 3, rows: int = 5000, texts: list[str] | None = None) -> Path:
    """The playbook's layout: shard_*.parquet with ONE row group per file."""
    d.mkdir(parents=True, exist_ok=True)
    texts = texts or [
        f"{t} #{i}" for i, t in enumerate(make_texts(np.random.default_rng(0), n_files * rows, 8))
    ]
    for f in range(n_files):
        chunk = texts[f * rows : (f + 1) * rows]
        pq.write_table(pa.table({"text": chunk}), d / f"shard_{f:05d}.parquet", row_group_size=len(chunk))
    return d


def test_playbook_one_row_group_shards_cannot_feed_8_ranks(tmp_path: Path) -> None:
    d = playbook_dir(tmp_path / "base_data")
    assert check_data_dir(d).ok  # fine for one rank
    line = assert_refused(
        cli("check", d, "--world-size", "8"), "cannot feed 8 ranks evenly", "armlab prepare"
    )
    assert "one row group per file" in cli("check", d, "--world-size", "8").stderr
    assert "re-shard" in line


def test_check_reports_tampering_empty_texts_and_bad_files(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    make_pool(pool, 1000, n_files=2)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(pool), eval_docs=20))
    assert cli("prepare", exp, "--workers", "1").returncode == 0
    d = tmp_path / "wd" / "arms" / "rand" / "data"
    assert cli("check", d).returncode == 0
    shard = d / "shard_00000.parquet"
    t = pq.read_table(shard)
    pq.write_table(
        t.set_column(0, "text", pa.array(["", *t.column("text").to_pylist()[1:]])), shard, row_group_size=64
    )
    res = check_data_dir(d)
    assert any("1 null or empty texts" in p for p in res.problems)
    assert any("sha256 differs" in p for p in res.problems)
    (d / "shard_00001.parquet").write_bytes(b"PAR1 not really")
    line = assert_refused(cli("check", d), "more problems above")
    assert "shard_00001.parquet: not readable parquet" in cli("check", d).stdout and "re-download" in line


RAND_HALF = """
[[arms]]
name = "rand"
kind = "random"
ratio = 0.5
"""


def pool_and_prebuilt(tmp_path: Path) -> tuple[Path, list[str], Path]:
    """A 2,000-doc pool, and a playbook-style prebuilt dir of its first 1,200 texts (no id column)."""
    pool = tmp_path / "pool"
    make_pool(pool, 2000, n_files=2, seed=4)
    texts = pq.read_table(pool, columns=["text"]).column("text").to_pylist()
    return pool, texts, playbook_dir(tmp_path / "prebuilt", n_files=3, rows=400, texts=texts[:1200])


def test_prebuilt_local_dir_drops_eval_docs_and_reshards(tmp_path: Path) -> None:
    pool, texts, prebuilt = pool_and_prebuilt(tmp_path)
    arms = f"""{RAND_HALF}
[[arms]]
name = "pre"
kind = "prebuilt"
uri = "{prebuilt}"
seed = 9
"""
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(pool), arms=arms, eval_docs=100))
    assert cli("check", prebuilt, "--world-size", "2").returncode == 2
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    wd = tmp_path / "wd"
    eval_texts = set(read_shards(wd / "eval", ["text"]).column("text").to_pylist())
    got = read_shards(wd / "arms" / "pre" / "data", ["text"]).column("text").to_pylist()
    removed = eval_texts & set(texts[:1200])
    assert removed and set(got) == set(texts[:1200]) - removed and len(got) == 1200 - len(removed)
    assert got != [t for t in texts[:1200] if t not in removed]  # reshuffled
    m = json.loads((wd / "arms" / "pre" / "data" / "manifest.json").read_text())
    assert m["eval_removed"] == len(removed) and m["complete"]
    assert cli("check", wd / "arms" / "pre" / "data", "--world-size", "2").returncode == 0
    assert "up to date" in cli("prepare", exp, "--arm", "pre", "--workers", "1").stderr


def test_prebuilt_arm_capped_by_rows_or_tokens_is_a_seeded_uniform_sample(tmp_path: Path) -> None:
    """max_rows / max_tokens on a prebuilt arm (the playbook's 60B-token top arm cut to a run's
    budget): a uniform sample of its files minus the eval docs, exact in rows, the same for any
    worker count."""
    pool, texts, prebuilt = pool_and_prebuilt(tmp_path)
    arms = f"""{RAND_HALF}
[[arms]]
name = "prerows"
kind = "prebuilt"
uri = "{prebuilt}"
max_rows = 300

[[arms]]
name = "pretok"
kind = "prebuilt"
uri = "{prebuilt}"
max_tokens = 5000
"""
    shas = []
    for workers in ("1", "2"):
        wd = tmp_path / f"wd{workers}"
        exp = tmp_path / f"exp{workers}.toml"
        exp.write_text(experiment_toml(wd, str(pool), arms=arms, eval_docs=100))
        res = cli("prepare", exp, "--workers", workers)
        assert res.returncode == 0, res.stderr
        shas.append(
            {
                a: json.loads((wd / "arms" / a / "data" / "manifest.json").read_text())["files"]
                for a in ("prerows", "pretok")
            }
        )
    assert shas[0] == shas[1]
    eval_texts = set(read_shards(wd / "eval", ["text"]).column("text").to_pylist())
    allowed = set(texts[:1200]) - eval_texts
    rows = read_shards(wd / "arms" / "prerows" / "data", ["text"]).column("text").to_pylist()
    assert len(rows) == 300 == len(set(rows)) and set(rows) <= allowed
    assert all(any(t in rows for t in texts[f * 400 : (f + 1) * 400]) for f in range(3))  # from every file
    toks = read_shards(wd / "arms" / "pretok" / "data", ["text"]).column("text").to_pylist()
    est = [len(t) / 4 for t in toks]  # CHARS_PER_TOKEN: prebuilt shards carry no token counts
    assert set(toks) <= allowed and sum(est) >= 5000 > sum(est) - max(est)
    m = json.loads((wd / "arms" / "pretok" / "data" / "manifest.json").read_text())
    assert m["cap"] and m["selection"]["max_tokens"] == 5000 and m["rows"] == len(toks)


def test_plan_estimates_then_reads_manifests(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    make_pool(pool, 3000, n_files=3)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(pool), eval_docs=100))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(exp.read_text().replace('text_column = "text"', 'text_column = "txt"'))
    assert 'text_column = "txt"' in wrong.read_text()
    assert_refused(cli("plan", wrong), "no text in column 'txt'", "[pool] text_column")
    before = cli("plan", exp)
    assert before.returncode == 0, before.stderr
    lines = {ln.split()[0]: ln.split() for ln in before.stdout.splitlines()[2:]}
    assert lines["rand"][2] == "estimate" and int(lines["rand"][3].replace(",", "")) == int(0.3 * 2900)
    assert "train refuses to repeat it" in before.stderr
    assert cli("prepare", exp, "--workers", "1").returncode == 0
    after = cli("plan", exp)
    lines = {ln.split()[0]: ln.split() for ln in after.stdout.splitlines()[2:]}
    m = json.loads((tmp_path / "wd" / "arms" / "top" / "data" / "manifest.json").read_text())
    assert lines["top"][2] == "manifest" and int(lines["top"][3].replace(",", "")) == m["rows"] == 580
    from armlab.budget import training_budget
    from armlab.spec import load_experiment

    epochs = training_budget(load_experiment(exp)).tokens / m["tokens"]
    assert lines["top"][6] == f"{epochs:.2f}"


@pytest.mark.parametrize("ws", [1, 4])
def test_check_api_counts(tmp_path: Path, ws: int) -> None:
    d = playbook_dir(tmp_path / "d", n_files=2, rows=100)
    res = check_data_dir(d, world_size=ws)
    assert (res.files, res.rows, res.row_groups) == (2, 200, 2)
    assert res.ok == (ws == 1)


def test_foreign_manifest_and_too_few_documents_get_the_right_fix(tmp_path: Path) -> None:
    d = tmp_path / "foreign"
    d.mkdir()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(40)]}), d / "a.parquet", row_group_size=10)
    (d / "manifest.json").write_text('{"files": 4}')  # somebody else's manifest
    res = check_data_dir(d)
    assert not res.ok and "not a shard manifest" in res.problems[0] and "move the foreign" in res.fix
    (d / "manifest.json").unlink()
    # 4 row groups of 10 documents: too few documents for 8 ranks, whatever the row-group size
    res = check_data_dir(d, world_size=8)
    assert "4 row groups cannot feed 8 ranks" in res.problems[0]
    assert "only 40 documents, too few for 8 ranks" in res.fix and "re-shard" not in res.fix
    # enough documents for 2 ranks: the fix names the row-group size that works (40 // 16 = 2)
    res = check_data_dir(d, world_size=2)
    assert "row groups of <= 2 rows" in res.fix


def test_an_incomplete_arm_never_trains_and_check_names_the_files(tmp_path: Path) -> None:
    """Every file the manifest lists must be there at its size: the loader's start-up check
    (check_feeds, what training runs before starting ranks) refuses otherwise, as does check."""
    from armlab.errors import ArmlabError
    from armlab.train.units import check_feeds

    pool = tmp_path / "pool"
    make_pool(pool, 2000, n_files=2)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(pool), eval_docs=20))
    assert cli("prepare", exp, "--workers", "1").returncode == 0
    d = tmp_path / "wd" / "arms" / "rand" / "data"
    check_feeds(d, 2)
    (d / "shard_00001.parquet").unlink()  # what a racing prepare left behind in 0.1
    with pytest.raises(ArmlabError, match=r"incomplete data: shard_00001\.parquet: listed in manifest\.json but missing"):
        check_feeds(d, 1)
    shard = d / "shard_00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    res = check_data_dir(d)
    assert any("shard_00000.parquet: " in p and "manifest.json says" in p for p in res.problems), res.problems
    assert any("shard_00001.parquet: listed in manifest.json but missing" in p for p in res.problems)
