"""`armlab prepare` end to end on real parquet/jsonl pools, through the real CLI (subprocesses).

One module-scoped prepared workdir (workers=2) serves the correctness checks; determinism
(workers 1 vs 2, another file layout and format, SIGKILL + rerun) compares sha256s with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.data.identity import doc_keys
from armlab.data.shards import read_shards
from data_util import DEFAULT_ARMS, all_shas, experiment_toml, make_pool, pool_index

ARMS = (
    DEFAULT_ARMS
    + """
[[arms]]
name = "samp"
kind = "sample"
ratio = 0.1
score_column = "score"
temperature = 0.5
seed = 3

[[arms]]
name = "cap"
kind = "random"
ratio = 0.5
max_rows = 400

[[arms]]
name = "toktop"
kind = "top"
ratio = 0.25
score_column = "score"
by = "tokens"
"""
)
N_DOCS, EVAL_DOCS = 6000, 200
CHI2_DF5_P001 = 20.515  # chi-square critical value, 5 degrees of freedom, p = 0.001


def cli(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def assert_refused(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2 with one `armlab: error:` line naming the culprit, and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("armlab: error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def texts(d: Path) -> list[str]:
    return read_shards(d, columns=["text"]).column("text").to_pylist()


def write_exp(tmp: Path, pool_uri: str | Path, arms: str = ARMS, name: str = "exp.toml", **kw: str) -> Path:
    p = tmp / name
    p.write_text(
        experiment_toml(tmp / "wd", str(pool_uri), arms=arms, eval_docs=kw.pop("eval_docs", EVAL_DOCS), **kw)
    )
    return p


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("prepared")
    paths = make_pool(tmp / "pool", N_DOCS, n_files=6, row_groups_per_file=3, seed=7)
    exp = write_exp(tmp, tmp / "pool")
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    return {
        "tmp": tmp,
        "exp": exp,
        "wd": tmp / "wd",
        "paths": paths,
        "index": pool_index(paths),
        "stdout": res.stdout,
    }


def arm_rows(prepared: dict, arm: str) -> list[dict]:
    return [prepared["index"][t] for t in texts(prepared["wd"] / "arms" / arm / "data")]


def eval_ids(prepared: dict) -> set[str]:
    return {prepared["index"][t]["id"] for t in texts(prepared["wd"] / "eval")}


def test_eval_set_is_exact_keyed_and_held_out_of_every_arm(prepared: dict) -> None:
    wd = prepared["wd"]
    ev = read_shards(wd / "eval")
    assert ev.num_rows == EVAL_DOCS
    ids = [prepared["index"][t]["id"] for t in ev.column("text").to_pylist()]
    assert (ev.column("key").to_numpy() == doc_keys(pa.array(ids), None)).all()
    held = set(ids)
    for d in [*(wd / "arms").glob("*/data"), wd / "tokenizer" / "sample"]:
        got = {prepared["index"][t]["id"] for t in texts(d)}
        assert got and not got & held, d


def test_top_arm_is_exactly_the_top_ratio_by_score(prepared: dict) -> None:
    held = eval_ids(prepared)
    pool = [r for r in prepared["index"].values() if r["id"] not in held]
    k = round(0.2 * (N_DOCS - EVAL_DOCS))
    best = {r["id"] for r in sorted(pool, key=lambda r: -r["score"])[:k]}
    assert {r["id"] for r in arm_rows(prepared, "top")} == best


def test_top_by_tokens_reaches_the_token_share(prepared: dict) -> None:
    held = eval_ids(prepared)
    pool = [r for r in prepared["index"].values() if r["id"] not in held]
    target = 0.25 * sum(r["token_count"] for r in pool)
    rows = arm_rows(prepared, "toktop")
    got = sum(r["token_count"] for r in rows)
    assert target <= got <= target + max(r["token_count"] for r in pool)
    assert min(r["score"] for r in rows) >= max(
        r["score"] for r in pool if r["id"] not in {x["id"] for x in rows}
    )
    manifest = json.loads((prepared["wd"] / "arms" / "toktop" / "data" / "manifest.json").read_text())
    assert manifest["tokens"] == got and manifest["tokens_source"] == "token_count"


def test_random_arm_size_is_binomial(prepared: dict) -> None:
    n, p = N_DOCS - EVAL_DOCS, 0.3
    got = len(arm_rows(prepared, "rand"))
    assert abs(got - n * p) < 4 * np.sqrt(n * p * (1 - p))


def test_sample_arm_exact_size_and_prefers_high_scores(prepared: dict) -> None:
    rows = arm_rows(prepared, "samp")
    assert len(rows) == round(0.1 * (N_DOCS - EVAL_DOCS))
    rand_mean = np.mean([r["score"] for r in arm_rows(prepared, "rand")])
    # exp(score / 0.5) weighting over N(0, 1) scores shifts the mean by ~2 (tilted normal)
    assert np.mean([r["score"] for r in rows]) > rand_mean + 1.0


def test_max_rows_caps_to_a_uniform_sample(prepared: dict) -> None:
    rows = arm_rows(prepared, "cap")
    assert len(rows) == 400
    # the capped arm is a subset of ratio-0.5 membership, spread over all source files
    assert len({r["source"] for r in rows}) == 6


def test_shuffle_first_shard_mixes_source_files(prepared: dict) -> None:
    wd = prepared["wd"]
    for arm in ("rand", "top"):
        d = wd / "arms" / arm / "data"
        arm_sources = Counter(prepared["index"][t]["source"] for t in texts(d))
        first = Counter(
            prepared["index"][t]["source"]
            for t in pq.read_table(d / "shard_00000.parquet").column("text").to_pylist()
        )
        n = sum(first.values())
        total = sum(arm_sources.values())
        chi2 = sum((first[s] - n * c / total) ** 2 / (n * c / total) for s, c in arm_sources.items())
        assert len(arm_sources) == 6 and chi2 < CHI2_DF5_P001, (arm, first, chi2)


def test_shards_follow_the_contract(prepared: dict) -> None:
    for d in [
        *(prepared["wd"] / "arms").glob("*/data"),
        prepared["wd"] / "eval",
        prepared["wd"] / "tokenizer" / "sample",
    ]:
        m = json.loads((d / "manifest.json").read_text())
        assert m["complete"] is True and m["pool_fingerprint"] and m["selection"]
        assert [f["name"] for f in m["files"]] == [f"shard_{i:05d}.parquet" for i in range(len(m["files"]))]
        rows = 0
        for f in m["files"]:
            pf = pq.ParquetFile(d / f["name"])
            assert pf.metadata.num_rows == f["rows"] <= 300
            assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            assert all(s == 64 for s in sizes[:-1]) and sizes[-1] <= 64 and f["row_groups"] == len(sizes)
            text = pf.read().column("text")
            assert text.null_count == 0 and min(len(t) for t in text.to_pylist()) > 0
            assert hashlib.sha256((d / f["name"]).read_bytes()).hexdigest() == f["sha256"]
            rows += f["rows"]
        assert rows == m["rows"]
        assert cli("check", d, *(["--world-size", "2"] if d.parent.name == "rand" else [])).returncode == 0


def test_tokenizer_sample_is_about_train_chars(prepared: dict) -> None:
    m = json.loads((prepared["wd"] / "tokenizer" / "sample" / "manifest.json").read_text())
    assert 0.8 * 200_000 < m["chars"] < 1.2 * 200_000


def test_rerun_is_a_noop_and_workers_1_is_byte_identical(prepared: dict, tmp_path: Path) -> None:
    before = all_shas(prepared["wd"])
    res = cli("prepare", prepared["exp"], "--workers", "2")
    assert res.returncode == 0 and "up to date" in res.stderr
    assert all_shas(prepared["wd"]) == before
    exp1 = write_exp(tmp_path, prepared["tmp"] / "pool")
    assert cli("prepare", exp1, "--workers", "1").returncode == 0
    assert all_shas(tmp_path / "wd") == before


def test_selection_is_independent_of_file_layout_and_format(prepared: dict, tmp_path: Path) -> None:
    """Same documents re-split into 4 .jsonl.zst files: byte-identical eval set and arms."""
    import zstandard

    rows = pq.read_table(prepared["tmp"] / "pool").to_pylist()
    pool = tmp_path / "pool"
    pool.mkdir()
    for i, chunk in enumerate(np.array_split(np.arange(len(rows)), 4)):
        body = "".join(json.dumps(rows[j]) + "\n" for j in chunk[::-1])  # and reversed within each file
        (pool / f"p{i}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(body.encode()))
    exp = write_exp(tmp_path, pool)
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    got, want = all_shas(tmp_path / "wd"), all_shas(prepared["wd"])
    for name in ("eval", "rand", "top", "samp", "cap", "toktop"):
        got[name].pop("manifest.json"), want[name].pop("manifest.json")  # pool fingerprints differ
        assert got[name] == want[name], name


def test_remote_pool_goes_through_the_fetch_cache(prepared: dict, tmp_path: Path) -> None:
    exp = write_exp(tmp_path, f"file://{prepared['tmp'] / 'pool'}")
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    got, want = all_shas(tmp_path / "wd"), all_shas(prepared["wd"])
    for name in ("eval", "rand", "top"):
        got[name].pop("manifest.json"), want[name].pop("manifest.json")
        assert got[name] == want[name], name
    cache = tmp_path / "wd" / "cache"
    assert not [p for p in cache.rglob("*") if p.is_file()], "fetched files must be deleted after use"


@pytest.mark.e2e
def test_sigkill_mid_prepare_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    make_pool(tmp_path / "pool", 40_000, n_files=20, row_groups_per_file=2, seed=1)
    arms = ARMS.split('[[arms]]\nname = "samp"')[0]  # rand + top
    killed = write_exp(tmp_path, tmp_path / "pool", arms=arms)
    cmd = [
        sys.executable,
        "-c",
        "from armlab.cli import main; main()",
        "prepare",
        str(killed),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done: list[Path] = []
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = list((tmp_path / "wd" / "cache" / "prepare").glob("stage-*/done/*.json"))
        if len(done) >= 5:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (tmp_path / "wd" / "arms" / "rand" / "data" / "manifest.json").exists()
    res = cli("prepare", killed, "--workers", "1")
    assert res.returncode == 0, res.stderr
    clean_dir = tmp_path / "clean"
    clean_dir.mkdir()
    clean = write_exp(clean_dir, tmp_path / "pool", arms=arms)
    assert cli("prepare", clean, "--workers", "2").returncode == 0
    assert all_shas(tmp_path / "wd") == all_shas(clean_dir / "wd")
    assert not list((tmp_path / "wd" / "cache" / "prepare").glob("*")), (
        "stage files are removed after success"
    )


def test_runner_started_beside_other_threads_uses_a_forkserver() -> None:
    """Forking copies only the calling thread, so with other threads alive (an app embedding
    armlab) the workers come from a forkserver instead, and still return every result in order."""
    import threading

    from armlab.data.prepare.executor import LocalExecutor

    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)
    other.start()
    try:
        ex = LocalExecutor(2)
        try:
            assert ex.pool is not None and ex.pool._mp_context.get_start_method() == "forkserver"
            got: dict[int, int] = {}
            ex.map(abs, [-3, 1, -2], got.__setitem__)
            assert got == {-3: 3, 1: 1, -2: 2}
        finally:
            ex.close()
    finally:
        stop.set()


# -- clean stops, no orphans ------------------------------------------------------------------------
def paused_prepare(tmp: Path, workers: int = 2) -> tuple[subprocess.Popen[str], Path]:
    """A real `armlab prepare` stopped (ARMLAB_TEST_PAUSE) at its first swap, workers alive."""
    make_pool(tmp / "pool", 2000, n_files=4, seed=3)
    exp = write_exp(tmp, tmp / "pool", arms=DEFAULT_ARMS)
    pause = tmp / "pause"
    pause.mkdir()
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(exp), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "ARMLAB_TEST_PAUSE": f"swap:{pause}"})  # fmt: skip
    deadline = time.time() + 60
    while not list(pause.glob("*.paused")):
        assert time.time() < deadline and proc.poll() is None, "prepare never reached its swap"
        time.sleep(0.02)
    return proc, exp


def gone_within(pids: list[int], seconds: float) -> list[int]:
    from armlab.workdir import pid_alive

    deadline = time.time() + seconds
    while (alive := [p for p in pids if pid_alive(p)]) and time.time() < deadline:
        time.sleep(0.05)
    return alive


def test_workers_exit_when_prepare_is_killed(tmp_path: Path) -> None:
    import psutil

    proc, _ = paused_prepare(tmp_path)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    assert len(workers) >= 2
    proc.kill()  # SIGKILL: no handler runs in the parent
    proc.wait()
    assert gone_within(workers, 5) == [], "prepare's workers outlived it"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_prepare_says_rerun_to_resume_and_the_rerun_finishes(tmp_path: Path, sig: signal.Signals) -> None:
    import psutil

    proc, exp = paused_prepare(tmp_path)
    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, sig)  # the whole group, as Ctrl-C in a terminal does
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"armlab: prepare stopped ({sig.name}); rerun to resume"
    assert gone_within(workers, 5) == []
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert not [p for p in (tmp_path / "wd" / "arms").rglob("data/*") if p.name.startswith(".")]


# -- the tokenizer sample is counted in documents ---------------------------------------------------
@pytest.mark.parametrize("lengths", ["estimated", "exact"])
def test_one_huge_document_does_not_shrink_the_tokenizer_sample(tmp_path: Path, lengths: str) -> None:
    """One 5 M-char document among ~300-char ones, placed early in the sample's seeded order:
    the sample still holds ~train_chars of text as the tokenizer reads it (documents capped at
    doc_cap = 10,000), hundreds of documents, whether document lengths come from token counts
    (estimated: the pool has ids) or from the text itself (exact)."""
    from armlab.data.holdout import tokenizer_order
    from armlab.data.identity import text_keys
    from armlab.spec import TokenizerSpec

    with_id = lengths == "estimated"
    paths = make_pool(tmp_path / "pool", 3000, n_files=3, seed=4, with_id=with_id)
    t = pq.read_table(paths[1])
    docs = t.column("text").to_pylist()
    spec = TokenizerSpec(vocab_size=512, train_chars=200_000)
    if with_id:  # the document with the earliest place in the order becomes huge
        order = tokenizer_order(doc_keys(t.column("id"), None), spec)
        i, docs[int(np.argmin(order))] = int(np.argmin(order)), "huge " * 1_000_000
    else:  # no id: the key is the text's hash, so find a huge text that lands among the first 300
        others = np.sort(tokenizer_order(text_keys(docs), spec))
        i = 7
        docs[i] = next(h for n in range(200) if tokenizer_order(text_keys([h := "huge " * 1_000_000 + str(n)]), spec)[0] < others[300])
    tokens = t.column("token_count").to_pylist()
    tokens[i] = len(docs[i]) // 4
    t = t.set_column(t.schema.get_field_index("text"), "text", pa.array(docs))
    pq.write_table(t.set_column(t.schema.get_field_index("token_count"), "token_count", pa.array(tokens)), paths[1])
    exp = write_exp(tmp_path, tmp_path / "pool", arms=DEFAULT_ARMS, eval_docs=50)
    if not with_id:
        exp.write_text(exp.read_text().replace('id_column = "id"\n', ""))
    res = cli("prepare", exp, "--workers", "1")
    assert res.returncode == 0, res.stderr
    sample = texts(tmp_path / "wd" / "tokenizer" / "sample")
    assert docs[i] in sample
    capped = sum(min(len(x), 10_000) for x in sample)
    m = json.loads((tmp_path / "wd" / "tokenizer" / "sample" / "manifest.json").read_text())
    assert m["capped_chars"] == capped and 200_000 <= capped < 200_000 + 10_000
    assert len(sample) > 500  # ~300 chars a document: ~650, not the ~40 a byte fraction would give


# -- arm data statistics ----------------------------------------------------------------------------
def test_manifest_stats_count_what_the_shards_hold(tmp_path: Path) -> None:
    from armlab.data.prepare.stats import DOC_CHARS_EDGES

    paths = make_pool(tmp_path / "pool", 1500, n_files=3, seed=9)
    index = pool_index(paths)
    exp = write_exp(tmp_path, tmp_path / "pool", arms=ARMS.split('[[arms]]\nname = "cap"')[0], report='group_column = "source"')
    res = cli("prepare", exp, "--workers", "2")
    assert res.returncode == 0, res.stderr
    wd = tmp_path / "wd"
    members = {a: [index[t] for t in texts(wd / "arms" / a / "data")] for a in ("rand", "top", "samp")}
    edges = None
    for arm, rows in members.items():
        st = json.loads((wd / "arms" / arm / "data" / "manifest.json").read_text())["stats"]
        chars = np.array([len(r["text"]) for r in rows])
        want = np.histogram(np.clip(chars, 1, DOC_CHARS_EDGES[-1] - 1), bins=DOC_CHARS_EDGES)[0].tolist()
        assert st["doc_chars"] == {"edges": DOC_CHARS_EDGES, "counts": want}
        sc = st["score"]
        assert sc["column"] == "score" and sum(sc["counts"]) == len(rows) and sc["nan"] == 0
        edges = edges or sc["edges"]
        assert sc["edges"] == edges  # one set of edges for every arm of the pass
        assert sc["counts"] == np.histogram([r["score"] for r in rows], bins=edges)[0].tolist()
        assert st["group"] == {"column": "source", "counts": dict(sorted(Counter(r["source"] for r in rows).items()))}
        ids = {r["id"] for r in rows}
        for other, orows in members.items():
            if other != arm:
                assert st["overlap"][other] == len(ids & {r["id"] for r in orows})
    held = {index[t]["id"] for t in texts(wd / "eval")}
    assert edges[0] == min(r["score"] for r in index.values() if r["id"] not in held)  # the pool's range
    assert edges[-1] == max(r["score"] for r in index.values() if r["id"] not in held)
    assert "stats" not in json.loads((wd / "eval" / "manifest.json").read_text())  # the report compares arms


# -- eval labels for per-group results ------------------------------------------------------------------
def test_eval_shards_carry_each_documents_group(tmp_path: Path) -> None:
    """With report.group_column, each eval document's group is written beside it, so compare
    can split val bpb by group; setting the column after the eval set
    was prepared writes the same documents again with their labels (no --overwrite needed, the
    eval set's fingerprint unchanged: no run's evaluation goes stale)."""
    paths = make_pool(tmp_path / "pool", 900, n_files=3, seed=4)
    index = pool_index(paths)
    exp = write_exp(tmp_path, tmp_path / "pool", arms=DEFAULT_ARMS, eval_docs=80)
    assert cli("prepare", exp, "--workers", "1").returncode == 0
    ev = tmp_path / "wd" / "eval"
    before = json.loads((ev / "manifest.json").read_text())
    docs = texts(ev)
    assert "group:source" not in pq.read_schema(sorted(ev.glob("shard_*.parquet"))[0]).names
    exp.write_text(exp.read_text().replace("[shards]", '[report]\ngroup_column = "source"\n\n[shards]'))
    res = cli("prepare", exp, "--workers", "1")
    assert res.returncode == 0, res.stderr
    after = json.loads((ev / "manifest.json").read_text())
    assert after["fingerprint"] == before["fingerprint"] and "group:source" in after["columns"]
    table = read_shards(ev)
    assert table.column("text").to_pylist() == docs  # the same documents, in the same order
    for text, group in zip(table.column("text").to_pylist(), table.column("group:source").to_pylist(), strict=True):
        assert group == index[text]["source"]
    assert table.column_names == ["text", "key", "text_key", "group:source"]  # only the label the report needs
    assert "are up to date" in cli("prepare", exp, "--workers", "1").stderr  # labelled now: nothing to do
