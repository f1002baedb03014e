"""Arms that select on a scorer (`score = "NAME"`): prepare joins the sidecars in its key pass and
ranks exactly as it ranks a score column (same documents, same shard bytes); scores that are
missing or stale (pool file changed, model changed, rescored) are named and refused with the
command that fixes them, the workdir untouched; every scorer's distribution reaches the arms'
manifests and compare's data section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.data.prepare import PrepareOptions, prepare
from armlab.data.score.run import ScoreOptions, score
from armlab.errors import ArmlabError
from armlab.report.datadiff import data_difference, score_table
from armlab.report.sections import data_section
from armlab.spec import load_experiment
from report_util import make_summary
from score_util import demo_documents, make_head, make_scored_pool, train_fasttext
from test_cli_refusals import refuse, tree_hash
from test_data_score_run import experiment

ARMS = """
[[arms]]
name = "top-ft"
kind = "top"
ratio = 0.3
score = "ft"

[[arms]]
name = "rand"
kind = "random"
ratio = 0.3
"""


@pytest.fixture(autouse=True)
def models_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    good, junk = demo_documents(n_junk=120)
    make_scored_pool(tmp_path / "pool", good[:300], junk[:80])
    train_fasttext(tmp_path / "quality.bin", good[300:], junk[80:])
    make_head(tmp_path / "head.safetensors", dim=8, hidden=4)
    return tmp_path


def shard_hashes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("shard_*.parquet"))}


def test_top_on_a_scorer_selects_as_top_on_the_same_scores_in_a_column(root: Path) -> None:
    exp = load_experiment(experiment(root, arms=ARMS))
    score(exp)
    prepare(exp)
    # the same pool with the sidecar's scores as a column, in another workdir
    twin = root / "twin"
    for p in sorted((root / "pool").glob("*.parquet")):
        side = pq.read_table(root / "wd" / "scores" / "ft" / "files" / p.name)
        t = pq.read_table(p)
        (twin / "pool").mkdir(parents=True, exist_ok=True)
        pq.write_table(t.append_column("ft", side.column("score").cast(pa.float64())), twin / "pool" / p.name)
    text = experiment(root, "", ARMS.replace('score = "ft"', 'score_column = "ft"'), name="twin.toml").read_text()
    (twin / "exp.toml").write_text(text.replace(f"{root}/wd", f"{twin}/wd").replace(f"{root}/pool", f"{twin}/pool"))
    prepare(load_experiment(twin / "exp.toml"))
    for d in ("arms/top-ft/data", "arms/rand/data", "eval"):
        a, b = shard_hashes(root / "wd" / d), shard_hashes(twin / "wd" / d)
        assert a and a == b, d

    m = json.loads((root / "wd" / "arms" / "top-ft" / "data" / "manifest.json").read_text())
    assert m["selection"]["score"] == "ft" and m["selection"]["scorer"] == {
        "kind": "fasttext", "model": str(root / "quality.bin"), "label": "__label__hq",
    }  # fmt: skip
    assert m["scorer"]["name"] == "ft" and len(m["scorer"]["model"]["sha256"]) == 64
    assert "by scorer ft's score" in m["selection"]["semantics"]
    # every scorer's distribution, for every arm (emb: no arm selects on it)
    rand = json.loads((root / "wd" / "arms" / "rand" / "data" / "manifest.json").read_text())
    for mf in (m, rand):
        assert set(mf["stats"]["scorers"]) == {"ft", "emb"}
        assert sum(mf["stats"]["scorers"]["ft"]["counts"]) == mf["rows"]
    assert rand["stats"]["scorers"]["emb"]["nan"] > 0  # null embeddings counted apart

    data = data_difference(exp, ["top-ft", "rand"], docs=50)["arms"]
    header, rows = score_table(data)
    assert header[:2] == ["score", "arm"] and [r[:2] for r in rows] == [
        ["scorer emb", "top-ft"], ["scorer emb", "rand"], ["scorer ft", "top-ft"], ["scorer ft", "rand"],
    ]  # fmt: skip
    assert float(rows[2][3]) > float(rows[3][3]) + 0.1  # the top arm's mean P(hq) is higher
    sec = data_section(make_summary(data={"arms": data}))  # the report's "what differs in the data"
    assert (header, rows) in sec.tables


def test_unscored_and_stale_scores_are_refused_naming_the_fix(root: Path, capsys, monkeypatch) -> None:
    exp_file = experiment(root, arms=ARMS)
    wd = root / "wd"
    line = refuse(capsys, monkeypatch, "prepare", str(exp_file))
    assert "arm 'top-ft' selects on scorer 'ft', which has not scored the pool" in line
    assert f"run `armlab score {exp_file} --scorer ft` first" in line
    assert not wd.exists()  # refused before the workdir was made

    exp = load_experiment(exp_file)
    score(exp)
    prepare(exp)
    # a pool file rewritten (one document changed): its scores are stale
    part = root / "pool" / "part-001.parquet"
    t = pq.read_table(part)
    texts = t.column("text").to_pylist()
    texts[0] = texts[0] + " (edited)"
    pq.write_table(t.set_column(t.schema.get_field_index("text"), "text", pa.array(texts)), part, row_group_size=64)
    before = tree_hash(wd)
    capsys.readouterr()
    line = refuse(capsys, monkeypatch, "prepare", str(exp_file), "--overwrite")
    assert "has no scores for 1 of 2 pool files (part-001.parquet changed since it was scored)" in line
    assert f"`armlab score {exp_file} --scorer ft`" in line
    assert tree_hash(wd) == before
    score(exp, names=["ft", "emb"])  # rescored: only part-001
    prepare(exp, options=PrepareOptions(overwrite=True))

    # another model behind the same path: the scores are of another model
    shutil.copy(root / "quality.bin", root / "old.bin")
    good, junk = demo_documents(n_junk=40, seed=3)
    train_fasttext(root / "quality.bin", good[::2], junk, seed=5)
    before = tree_hash(wd)
    capsys.readouterr()
    line = refuse(capsys, monkeypatch, "prepare", str(exp_file), "--overwrite")
    assert "which holds scores of another model or settings" in line and "--scorer ft --overwrite` first" in line
    assert tree_hash(wd) == before
    score(exp, names=["ft"], options=ScoreOptions(overwrite=True))
    # the prepared arm was selected on the old scores: re-preparing it needs --overwrite
    capsys.readouterr()
    line = refuse(capsys, monkeypatch, "prepare", str(exp_file), "--arm", "top-ft")
    assert "'top-ft' was selected on other scores of scorer 'ft' (rescored since); rerun with --overwrite" in line
    prepare(exp, arms=["top-ft"], options=PrepareOptions(overwrite=True))
    m = json.loads((wd / "arms" / "top-ft" / "data" / "manifest.json").read_text())
    side = json.loads((wd / "scores" / "ft" / "manifest.json").read_text())
    assert m["scorer"]["identity"] == side["identity"] and m["scorer"]["model"]["sha256"] == side["model"]["sha256"]


def test_key_pass_refuses_a_sidecar_whose_keys_are_not_the_files(root: Path) -> None:
    """A sidecar swapped under a fresh manifest (hand edits, a copy from elsewhere) is never used."""
    exp = load_experiment(experiment(root, arms=ARMS))
    score(exp, names=["ft"])
    d = root / "wd" / "scores" / "ft" / "files"
    a, b = d / "part-000.parquet", d / "part-001.parquet"
    ta, tb = pq.read_table(a), pq.read_table(b)
    pq.write_table(tb.slice(0, ta.num_rows).replace_schema_metadata(ta.schema.metadata), a)  # keys of another file
    with pytest.raises(ArmlabError, match=r"part-000.parquet: its document keys are not those of .*part-000.parquet"):
        prepare(exp)
    np.testing.assert_array_equal(pq.read_table(a).column("key").to_numpy()[:5], tb.column("key").to_numpy()[:5])


def test_the_eval_set_can_be_grouped_by_a_scorers_score(root: Path) -> None:
    """`[report] group_column = "ft"` with `group_bins`: each eval document's ft score (from the
    sidecars the key pass joins) is written beside it, for compare's per-group val bpb."""
    path = experiment(root, arms=ARMS)
    path.write_text(path.read_text() + '\n[report]\ngroup_column = "ft"\ngroup_bins = 3\n')
    exp = load_experiment(path)
    score(exp)
    prepare(exp)
    ev = root / "wd" / "eval"
    table = pa.concat_tables(pq.read_table(p) for p in sorted(ev.glob("shard_*.parquet")))
    assert table.column_names == ["text", "key", "text_key", "scorer:ft"]
    by_id = {}
    for p in sorted((root / "pool").glob("*.parquet")):
        side = pq.read_table(root / "wd" / "scores" / "ft" / "files" / p.name).column("score").to_pylist()
        ids = pq.read_table(p, columns=["text"]).column("text").to_pylist()
        by_id.update(zip(ids, side, strict=True))
    got = table.column("scorer:ft").to_pylist()
    assert got == pytest.approx([by_id[t] for t in table.column("text").to_pylist()])
