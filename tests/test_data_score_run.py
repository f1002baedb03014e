"""`armlab score` end to end on real parquet with real models: one keyed sidecar per pool file
and a manifest; the same bytes for any worker count and any cut of a file into row-group units;
resumable (a killed run's sidecars are adopted by their footers, a missing one is scored again);
another model's scores refused unless --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from armlab.data.identity import doc_keys
from armlab.data.score import run as score_run
from armlab.data.score.run import ScoreOptions, score
from armlab.errors import ArmlabError
from armlab.spec import load_experiment, with_overrides
from score_util import demo_documents, make_bert, make_head, make_scored_pool, train_fasttext

SCORERS = """
[[scorers]]
name = "ft"
kind = "fasttext"
model = "{root}/quality.bin"
label = "__label__hq"

[[scorers]]
name = "emb"
kind = "head"
model = "{root}/head.safetensors"
column = "embedding"
"""

BERT = """
[[scorers]]
name = "bert"
kind = "hf"
model = "{root}/bert"
max_length = 64
batch_size = 8
"""


def experiment(
    root: Path, scorers: str = SCORERS, arms: str = "", name: str = "exp.toml", workdir: Path | None = None
) -> Path:
    """The scorer tests' experiment file, `name` beside its workdir (default `root`/wd)."""
    arms = arms or '[[arms]]\nname = "rand"\nkind = "random"\nratio = 0.5\n'
    workdir = workdir or root / "wd"
    text = f"""name = "scoretest"
workdir = "{workdir}"

[pool]
uri = "{root}/pool/*.parquet"
id_column = "id"
token_count_column = "token_count"

[eval]
docs = 30

[tokenizer]
vocab_size = 512
train_chars = 100000

[shards]
rows_per_shard = 100
row_group_rows = 25
{scorers.format(root=root)}
{arms}
[model]
depth = 2
max_seq_len = 64
"""
    path = workdir.parent / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def scored_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pool of demo good and junk documents (2 files of 3 row groups), a fastText model trained
    on other demo documents, and a random MLP head over the pool's 8-float embeddings."""
    root = tmp_path_factory.mktemp("score")
    good, junk = demo_documents(n_junk=120)
    make_scored_pool(root / "pool", good[:360], junk[:90])
    train_fasttext(root / "quality.bin", good[360:], junk[90:])
    make_head(root / "head.safetensors", dim=8, hidden=4)
    return root


@pytest.fixture(autouse=True)
def models_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))  # content-hash records stay here


def hashes(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.parquet"))
    }


def test_score_writes_a_keyed_sidecar_per_pool_file_and_a_manifest(scored_root: Path) -> None:
    exp_file = experiment(scored_root)
    env = {**os.environ, "ARMLAB_PROGRESS_EVERY": "0"}
    r = subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", "score", str(exp_file), "--workers", "2"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    scores = scored_root / "wd" / "scores"
    assert r.stdout.split() == ["ft", str(scores / "ft"), "emb", str(scores / "emb")]
    assert "score ft: 2 pool files, 450 docs" in r.stderr and "docs/s" in r.stderr
    assert "score emb:" in r.stderr and "have no score" in r.stderr  # a few null embeddings

    for name in ("ft", "emb"):
        m = json.loads((scores / name / "manifest.json").read_text())
        assert sorted(m["files"]) == ["part-000.parquet", "part-001.parquet"]
        assert m["scorer"]["name"] == name and len(m["identity"]) == 16
        assert len(m["model"]["sha256"]) == 64 and m["model"]["ref"].startswith("sha256:")
        for rel, entry in m["files"].items():
            pool_file = scored_root / "pool" / rel
            side = pq.read_table(scores / name / entry["sidecar"])
            assert side.schema.names == ["key", "score"] and str(side.schema.field("score").type) == "float"
            ids = pq.read_table(pool_file, columns=["id"]).column("id")
            assert np.array_equal(side.column("key").to_numpy(), doc_keys(ids, None))  # row-aligned, keyed
            assert entry["rows"] == side.num_rows and entry["unscored"] == int(np.isnan(side.column("score").to_numpy()).sum())
            footer = json.loads(pq.read_schema(scores / name / entry["sidecar"]).metadata[b"armlab.scores"])
            assert footer["pool_file"] == rel and footer["scorer"] == m["identity"]
    ft = pq.read_table(scores / "ft" / "files" / "part-000.parquet").column("score").to_numpy()
    source = pq.read_table(scored_root / "pool" / "part-000.parquet", columns=["source"]).column("source").to_pylist()
    good = np.array([s == "good" for s in source])
    assert ft[good].mean() > ft[~good].mean() + 0.3  # the classifier sees the junk
    emb = pq.read_table(scores / "emb" / "files" / "part-000.parquet").column("score").to_numpy()
    assert np.isnan(emb).sum() == 3  # make_scored_pool nulls every 97th embedding


def test_scores_are_the_same_bytes_for_any_workers_and_units(scored_root: Path, monkeypatch) -> None:
    exp = load_experiment(experiment(scored_root))
    one = with_overrides(exp, {"score.scores_dir": str(scored_root / "s1")})
    score(one, options=ScoreOptions(workers=1))
    monkeypatch.setattr(score_run, "UNIT_ROWS", 80)  # 2 files x 3 row groups of 75 rows: 6 units of one group
    two = with_overrides(exp, {"score.scores_dir": str(scored_root / "s2")})
    score(two, options=ScoreOptions(workers=2))
    for name in ("ft", "emb"):
        a, b = hashes(scored_root / "s1" / name), hashes(scored_root / "s2" / name)
        assert sorted(a) == ["files/part-000.parquet", "files/part-001.parquet"] and a == b
        assert not (scored_root / "s2" / name / "parts").exists() or not any((scored_root / "s2" / name / "parts").rglob("*.parquet"))


def test_hf_scores_are_the_same_bytes_for_one_or_two_workers(scored_root: Path) -> None:
    good, junk = demo_documents(n_junk=20)
    make_bert(scored_root / "bert", good[:200] + junk)
    exp = load_experiment(experiment(scored_root, BERT, name="bert.toml"))
    for n in (1, 2):
        score(with_overrides(exp, {"score.scores_dir": str(scored_root / f"b{n}")}), options=ScoreOptions(workers=n, device="cpu"))
    assert hashes(scored_root / "b1" / "bert") == hashes(scored_root / "b2" / "bert")
    m = json.loads((scored_root / "b1" / "bert" / "manifest.json").read_text())
    assert {f["dtype"] for f in m["files"].values()} == {"float32"} and m["last_run"]["device"] == "cpu"


def test_score_resumes_adopting_what_a_killed_run_wrote(scored_root: Path, capsys) -> None:
    exp = with_overrides(load_experiment(experiment(scored_root)), {"score.scores_dir": str(scored_root / "r")})
    score(exp, names=["ft"])
    d = scored_root / "r" / "ft"
    first = {p: p.stat().st_mtime_ns for p in (d / "files").rglob("*.parquet")}
    # killed after writing both sidecars, before the manifest: the next run adopts them by their footers
    (d / "manifest.json").unlink()
    capsys.readouterr()
    score(exp, names=["ft"])
    assert "2 pool files already scored" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in first} == first
    assert sorted(json.loads((d / "manifest.json").read_text())["files"]) == ["part-000.parquet", "part-001.parquet"]
    # one sidecar lost: only that file is scored again
    (d / "files" / "part-001.parquet").unlink()
    score(exp, names=["ft"])
    assert "score ft: 1 pool file, 225 docs" in capsys.readouterr().err
    assert (d / "files" / "part-000.parquet").stat().st_mtime_ns == first[d / "files" / "part-000.parquet"]


def test_score_refuses_another_models_scores_unless_overwrite(scored_root: Path, tmp_path: Path) -> None:
    exp = with_overrides(load_experiment(experiment(scored_root)), {"score.scores_dir": str(tmp_path / "s")})
    score(exp, names=["emb"])
    before = hashes(tmp_path / "s" / "emb")
    make_head(tmp_path / "other.safetensors", dim=8, hidden=4, seed=7)
    other = with_overrides(exp, {"score.scores_dir": str(tmp_path / "s")})
    data = other.model_dump(mode="json")
    data["scorers"][1]["model"] = str(tmp_path / "other.safetensors")
    from armlab.spec import parse_experiment

    other = parse_experiment(data)
    with pytest.raises(ArmlabError, match=r"another model or settings \(model differ.*--scorer emb --overwrite"):
        score(other, names=["emb"])
    assert hashes(tmp_path / "s" / "emb") == before  # refused: nothing touched
    score(other, names=["emb"], options=ScoreOptions(overwrite=True))
    after = hashes(tmp_path / "s" / "emb")
    assert sorted(after) == sorted(before) and after != before


def test_a_remote_pool_scores_as_the_same_pool_on_disk(scored_root: Path, monkeypatch) -> None:
    """http pool (ranged reads of only the columns a unit needs, in row-group ranges): the same
    keys and scores as the local copy, sidecars named by the files' paths under the pool root."""
    from http_util import PoolServer, widen

    exp = load_experiment(experiment(scored_root))
    score(with_overrides(exp, {"score.scores_dir": str(scored_root / "loc")}), names=["ft"])
    served = scored_root / "served"
    shutil.copytree(scored_root / "pool", served)
    widen(sorted(served.glob("*.parquet")), 4000)  # a wide column no scorer reads
    monkeypatch.setattr(score_run, "UNIT_ROWS", 80)  # 3 units a file: ranged reads of row groups [lo, hi)
    with PoolServer(served) as server:
        remote = with_overrides(exp, {"pool.uri": f"{server.url}/", "score.scores_dir": str(scored_root / "rem")})
        score(remote, names=["ft"], options=ScoreOptions(workers=2))
        sent = server.log.file_bytes(".parquet")
    for name in ("part-000.parquet", "part-001.parquet"):
        a = pq.read_table(scored_root / "loc" / "ft" / "files" / name)
        b = pq.read_table(scored_root / "rem" / "ft" / "files" / name)
        assert a.equals(b.replace_schema_metadata(a.schema.metadata))
    assert sent < 0.5 * sum(p.stat().st_size for p in served.glob("*.parquet"))  # the wide column stayed there


def test_relative_names_follow_the_pool_root() -> None:
    from armlab.data.pool import PoolFile
    from armlab.data.score.sidecar import relative_names, sidecar_rel

    local = [PoolFile("/data/pool/a.parquet", 1, "parquet"), PoolFile("/data/pool/sub/b.jsonl.gz", 1, "jsonl")]
    assert relative_names("/data/pool", local) == {"/data/pool/a.parquet": "a.parquet", "/data/pool/sub/b.jsonl.gz": "sub/b.jsonl.gz"}
    assert relative_names("/data/pool/**/*.parquet", local[:1]) == {"/data/pool/a.parquet": "a.parquet"}
    assert relative_names("/data/pool/a.parquet", local[:1]) == {"/data/pool/a.parquet": "a.parquet"}
    hub = [PoolFile("datasets/o/d/data/CC-1/x.parquet", 1, "parquet", "hf")]
    assert list(relative_names("hf://datasets/o/d/data/**/*.parquet", hub).values()) == ["CC-1/x.parquet"]
    http = [PoolFile("http://h:1/pool/x.parquet", 1, "parquet", "http")]
    assert list(relative_names("http://h:1/pool/", http).values()) == ["x.parquet"]
    assert sidecar_rel("sub/b.jsonl.gz") == "files/sub/b.jsonl.gz.parquet" and sidecar_rel("a.parquet") == "files/a.parquet"
