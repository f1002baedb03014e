"""Bad input and safety refusals through the real CLI: one line naming the culprit, exit 2,
no traceback, nothing half-written. Also the fetch cache (retries, bounded prefetch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from armlab.data.fetch import Prefetcher, fetch_file
from armlab.data.pool import PoolFile, list_pool
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec
from armlab.store import Retry
from data_util import experiment_toml, make_pool
from test_data_prepare import assert_refused, cli

RANDOM_ARM = """
[[arms]]
name = "rand"
kind = "random"
ratio = 0.3
"""
TOP_ARM = """
[[arms]]
name = "top"
kind = "top"
ratio = 0.2
score_column = "score"
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pool")
    make_pool(d, 1200, n_files=3, seed=2, empty_every=97)
    return d


def exp_file(
    tmp: Path, pool_uri: Path | str, arms: str = RANDOM_ARM, text_column: str = "text", id_column: str = "id"
) -> Path:
    text = experiment_toml(tmp / "wd", str(pool_uri), arms=arms, eval_docs=20)
    text = text.replace('text_column = "text"', f'text_column = "{text_column}"')
    text = text.replace('id_column = "id"', f'id_column = "{id_column}"')
    p = tmp / "exp.toml"
    p.write_text(text)
    return p


def prepare(exp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return cli("prepare", exp, "--workers", "1", *args)  # one worker: these tests are about refusals


def assert_nothing_written(tmp: Path) -> None:
    wd = tmp / "wd"
    assert not list(wd.glob("arms/*/data")) and not (wd / "eval").exists()
    assert not [p for p in wd.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name]


def test_missing_text_column(pool: Path, tmp_path: Path) -> None:
    res = prepare(exp_file(tmp_path, pool, text_column="body"))
    assert_refused(res, "'body'", "part-000.parquet", "columns: id, text")
    assert_nothing_written(tmp_path)


def test_missing_id_column(pool: Path, tmp_path: Path) -> None:
    assert_refused(prepare(exp_file(tmp_path, pool, id_column="doc_id")), "'doc_id'")
    assert_nothing_written(tmp_path)


def test_null_ids(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    make_pool(d, 300, n_files=1)
    t = pq.read_table(d / "part-000.parquet")
    ids = t.column("id").to_pylist()
    ids[5] = None
    pq.write_table(t.set_column(0, "id", pa.array(ids)), d / "part-000.parquet")
    assert_refused(prepare(exp_file(tmp_path, d)), "part-000.parquet", "'id'", "1 null")
    assert_nothing_written(tmp_path)


def test_misspelt_score_column(pool: Path, tmp_path: Path) -> None:
    arms = TOP_ARM.replace('"score"', '"scroe"')
    assert_refused(prepare(exp_file(tmp_path, pool, arms=arms)), "'scroe'")
    assert_nothing_written(tmp_path)


def test_non_numeric_score(pool: Path, tmp_path: Path) -> None:
    arms = TOP_ARM.replace('"score"', '"source"')
    assert_refused(prepare(exp_file(tmp_path, pool, arms=arms)), "'source'", "not a number")
    assert_nothing_written(tmp_path)


def test_top_arm_with_all_scores_equal(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    make_pool(d, 300, n_files=1)
    t = pq.read_table(d / "part-000.parquet")
    pq.write_table(
        t.set_column(t.schema.get_field_index("score"), "score", pa.array([1.0] * t.num_rows)),
        d / "part-000.parquet",
    )
    assert_refused(prepare(exp_file(tmp_path, d, arms=TOP_ARM)), "arm 'top'", "'score'", "every document")
    assert_nothing_written(tmp_path)


def test_ratio_so_small_the_arm_is_empty(pool: Path, tmp_path: Path) -> None:
    arms = RANDOM_ARM.replace("0.3", "0.00001")
    assert_refused(prepare(exp_file(tmp_path, pool, arms=arms)), "arm 'rand'", "selects no documents")
    assert_nothing_written(tmp_path)


def test_empty_pool(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert_refused(prepare(exp_file(tmp_path, tmp_path / "empty")), "no parquet or jsonl")
    d = tmp_path / "zero"
    d.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": pa.array([], pa.string()),
                "text": pa.array([], pa.string()),
                "token_count": pa.array([], pa.int64()),
            }
        ),
        d / "a.parquet",
    )
    assert_refused(prepare(exp_file(tmp_path, d)), "no documents")
    assert_nothing_written(tmp_path)


def test_corrupt_parquet_named_then_skipped_and_recorded(pool: Path, tmp_path: Path) -> None:
    d = tmp_path / "pool"
    make_pool(d, 900, n_files=3, seed=2)
    bad = d / "part-001.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated download
    exp = exp_file(tmp_path, d)
    # two workers: the error must also travel back from a worker process intact
    assert_refused(cli("prepare", exp, "--workers", "2"), "part-001.parquet", "--skip-bad-files")
    assert_nothing_written(tmp_path)
    res = prepare(exp, "--skip-bad-files")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "wd" / "arms" / "rand" / "data" / "manifest.json").read_text())
    assert m["skipped_files"] == [str(bad)] and m["pool_rows"] == 600


def test_empty_and_null_texts_are_dropped_and_counted(pool: Path, tmp_path: Path) -> None:
    res = prepare(exp_file(tmp_path, pool, arms=RANDOM_ARM.replace("0.3", "1.0")))
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "wd" / "arms" / "rand" / "data" / "manifest.json").read_text())
    ev = json.loads((tmp_path / "wd" / "eval" / "manifest.json").read_text())
    # ratio 1.0: every non-eval document; 13 empty + 13 null texts in the pool (every 97th pair)
    assert m["dropped_empty"] + ev["dropped_empty"] == 26
    assert m["rows"] + ev["rows"] == 1200 - 26


def test_unreadable_workdir(pool: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    p = tmp_path / "exp.toml"
    p.write_text(experiment_toml(tmp_path / "file" / "wd", str(pool), arms=RANDOM_ARM, eval_docs=20))
    assert_refused(prepare(p), "workdir is not writable")


def test_lease_refusals_and_force(pool: Path, tmp_path: Path) -> None:
    exp = exp_file(tmp_path, pool)
    data = tmp_path / "wd" / "arms" / "rand" / "data"
    data.mkdir(parents=True)
    lease = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "run": "rand-s0"}
    (data / ".lease").write_text(json.dumps(lease))
    assert_refused(prepare(exp, "--force"), "leased by live", "rand-s0")
    (data / ".lease").write_text(json.dumps({**lease, "pid": 2**22 + 12345}))  # no such pid
    assert_refused(prepare(exp), "stale lease", "--force")
    res = prepare(exp, "--force")
    assert res.returncode == 0, res.stderr
    assert not (data / ".lease").exists() and (data / "manifest.json").exists()


def test_refuses_to_overwrite_an_arm_from_another_spec(pool: Path, tmp_path: Path) -> None:
    exp = exp_file(tmp_path, pool)
    assert prepare(exp).returncode == 0
    data = tmp_path / "wd" / "arms" / "rand" / "data"
    before = json.loads((data / "manifest.json").read_text())
    assert_refused(prepare(exp, "--arm", "rand", "--ratio", "0.5"), "rand", "ratio", "--overwrite")
    assert json.loads((data / "manifest.json").read_text()) == before
    res = prepare(exp, "--arm", "rand", "--ratio", "0.5", "--rows-per-shard", "100", "--overwrite")
    assert res.returncode == 0, res.stderr
    after = json.loads((data / "manifest.json").read_text())
    assert after["selection"]["ratio"] == 0.5 and after["shards"]["rows_per_shard"] == 100
    assert abs(after["rows"] - 0.5 * 1180) < 4 * (1180 * 0.25) ** 0.5
    assert_refused(prepare(exp, "--ratio", "0.5"), "--ratio / --seed apply to one arm")


# -- the fetch cache -------------------------------------------------------------------------------
class FlakyFS(LocalFileSystem):
    """A local filesystem whose reads fail the first `failures` times (a dropped connection)."""

    protocol = "flaky"
    failures = 0
    calls = 0
    in_cache_max = 0
    cache_dir: Path | None = None

    def _open(self, path, mode="rb", **kw):  # noqa: ANN001
        FlakyFS.calls += 1
        if FlakyFS.cache_dir is not None:
            n = len([p for p in FlakyFS.cache_dir.rglob("*.parquet")])
            FlakyFS.in_cache_max = max(FlakyFS.in_cache_max, n)
        if FlakyFS.failures > 0:
            FlakyFS.failures -= 1
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kw)


@pytest.fixture
def flaky() -> type[FlakyFS]:
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.failures, FlakyFS.calls, FlakyFS.in_cache_max, FlakyFS.cache_dir = 0, 0, 0, None
    return FlakyFS


def test_fetch_retries_then_fails_naming_the_file(pool: Path, tmp_path: Path, flaky: type[FlakyFS]) -> None:
    files = list_pool(PoolSpec(uri=f"flaky://{pool}"))
    assert [f.remote for f in files] == [True] * 3
    flaky.failures = 2
    got = fetch_file(files[0], tmp_path / "cache", Retry(attempts=4, backoff=0.0))
    assert got.read_bytes() == (pool / "part-000.parquet").read_bytes() and flaky.calls == 3
    assert not list(got.parent.glob(".*.part"))
    flaky.failures = 10
    with pytest.raises(ArmlabError, match=r"part-001\.parquet: failed after 3 attempts \(ConnectionError"):
        fetch_file(files[1], tmp_path / "cache", Retry(attempts=3, backoff=0.0))
    assert not (tmp_path / "cache" / "flaky" / str(pool).lstrip("/") / "part-001.parquet").exists()


def test_prefetcher_is_bounded_and_deletes_after_use(
    pool: Path, tmp_path: Path, flaky: type[FlakyFS]
) -> None:
    files = [
        PoolFile(
            f"{pool}/part-{i:03d}.parquet",
            (pool / f"part-{i:03d}.parquet").stat().st_size,
            "parquet",
            "flaky",
        )
        for i in range(3)
    ] * 2  # six "remote" files
    files = [PoolFile(f.path, f.size, f.fmt, f.protocol) for f in files]
    cache = tmp_path / "cache"
    flaky.cache_dir = cache
    pf = Prefetcher(files, list(range(len(files))), cache, ahead=2, retry=Retry(attempts=1))
    seen = []
    for i in range(len(files)):
        local = pf.get(i)
        seen.append(pq.ParquetFile(local).metadata.num_rows)
        pf.release(i)
    pf.close()
    assert seen == [400] * 6
    assert flaky.in_cache_max <= 2
    assert not list(cache.rglob("*.parquet"))


def test_jsonl_is_streamed_in_blocks_and_gives_the_parquet_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A jsonl file is read a block at a time (memory bounded however large the file), so a field
    that is not read may change type between blocks, and a score written as whole numbers in the
    first block is still a float: the shards equal those of the same documents in parquet."""
    from armlab.data import pool as pool_mod
    from armlab.data.prepare import PrepareOptions
    from armlab.data.prepare import prepare as prepare_api
    from armlab.data.shards import sha256_file, shard_paths
    from armlab.spec import load_experiment

    rows = pq.read_table(make_pool(tmp_path / "pq", 600, n_files=1, seed=5)[0]).to_pylist()
    for i, row in enumerate(rows):
        row["meta"] = None if i < 300 else {"lang": "en"}  # null in the first blocks, a struct later
        if i < 300:
            row["score"] = float(round(row["score"]))  # json.dumps writes 2.0: read as a number
    rows[0]["score"] = 1  # a whole number in the first block
    rows[400]["text"] += " long" * 20_000  # one line longer than a block: read again, bigger blocks
    parquet_rows = [{k: v for k, v in r.items() if k != "meta"} for r in rows]
    pq.write_table(pa.Table.from_pylist(parquet_rows), tmp_path / "pq" / "part-000.parquet")
    (tmp_path / "js").mkdir()
    jsonl = tmp_path / "js" / "part-000.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))

    monkeypatch.setattr(pool_mod, "JSON_BLOCK_BYTES", 1 << 14)
    pf = PoolFile(str(jsonl), jsonl.stat().st_size, "jsonl")
    blocks = list(pool_mod.iter_columns(pf, ["text", "score"], types={"score": pa.float64()}))
    assert len(blocks) > 5 and pa.concat_tables(blocks).to_pylist() == [
        {"text": r["text"], "score": r["score"]} for r in rows
    ]

    shas = {}
    for fmt in ("pq", "js"):
        (tmp_path / f"exp-{fmt}").mkdir()
        exp = exp_file(tmp_path / f"exp-{fmt}", tmp_path / fmt, arms=RANDOM_ARM + TOP_ARM)
        out = prepare_api(load_experiment(exp), options=PrepareOptions(workers=1))
        shas[fmt] = {a: [sha256_file(p) for p in shard_paths(d)] for a, d in out.items()}
    assert shas["js"] == shas["pq"] and all(shas["pq"].values())


# -- bad bytes, bad types, unscored and empty documents (issue 12/13) ------------------------------
def no_id(exp: Path) -> Path:
    exp.write_text(exp.read_text().replace('id_column = "id"\n', ""))
    return exp


def set_column(path: Path, name: str, values: pa.Array, row_group_size: int | None = None) -> None:
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index(name), name, values), path, row_group_size=row_group_size)


@pytest.mark.parametrize("with_id", [True, False])
def test_text_column_of_integers_is_refused_naming_column_and_type(tmp_path: Path, with_id: bool) -> None:
    d = tmp_path / "pool"
    make_pool(d, 300, n_files=1)
    set_column(d / "part-000.parquet", "text", pa.array(range(1000, 1300)))
    exp = exp_file(tmp_path, d)
    if not with_id:  # then the key pass reads the text itself
        no_id(exp)
    assert_refused(prepare(exp), "part-000.parquet", "text column 'text'", "int64", "not a string")
    assert_nothing_written(tmp_path)


def binary_pool(d: Path) -> Path:
    """Three files; part-001's text is UTF-8 *bytes* (binary), with one invalid row in row group 2."""
    make_pool(d, 900, n_files=3, seed=2)
    bad = d / "part-001.parquet"
    texts = [t.encode() for t in pq.read_table(bad).column("text").to_pylist()]
    texts[250] = b"caf\xe9 latin-1, not UTF-8"
    set_column(bad, "text", pa.array(texts, pa.binary()), row_group_size=100)
    return bad


def test_invalid_utf8_is_named_by_file_and_row_group_then_skipped(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    bad = binary_pool(d)
    exp = exp_file(tmp_path, d, arms=RANDOM_ARM + TOP_ARM)
    assert_refused(prepare(exp), "part-001.parquet", "invalid UTF-8", "'text'", "row group 2", "--skip-bad-files")
    assert_nothing_written(tmp_path)
    res = prepare(exp, "--skip-bad-files")
    assert res.returncode == 0, res.stderr
    assert "choosing the arms again without it" in res.stderr
    m = json.loads((tmp_path / "wd" / "arms" / "top" / "data" / "manifest.json").read_text())
    # the skipped file counts nowhere: the top arm is exactly 0.2 of the other files' non-eval docs
    assert m["skipped_files"] == [str(bad)] and m["pool_rows"] == 600 and m["rows"] == round(0.2 * 580)


def test_invalid_utf8_found_by_the_key_pass(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    binary_pool(d)
    exp = no_id(exp_file(tmp_path, d))
    assert_refused(prepare(exp), "part-001.parquet", "invalid UTF-8", "row group 2")
    res = prepare(exp, "--skip-bad-files")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "wd" / "eval" / "manifest.json").read_text())["pool_rows"] == 600


def test_unscored_documents_rank_last_and_are_counted(tmp_path: Path) -> None:
    """A third of the scores NaN or null: the top arm is still 0.2 of the pool (like the random
    arm of the same ratio), not 0.2 of the scored two thirds, and prepare says so."""
    d = tmp_path / "pool"
    make_pool(d, 1200, n_files=1, seed=2)
    scores = pq.read_table(d / "part-000.parquet").column("score").to_pylist()
    scores = [None if i % 6 == 0 else float("nan") if i % 3 == 0 else s for i, s in enumerate(scores)]
    set_column(d / "part-000.parquet", "score", pa.array(scores, pa.float64()))
    arms = RANDOM_ARM.replace("0.3", "0.2") + TOP_ARM + TOP_ARM.replace('name = "top"', 'name = "most"').replace("0.2", "0.9")
    res = prepare(exp_file(tmp_path, d, arms=arms))
    assert res.returncode == 0, res.stderr
    rows = {a: json.loads((tmp_path / "wd" / "arms" / a / "data" / "manifest.json").read_text())["rows"]
            for a in ("rand", "top", "most")}  # fmt: skip
    n = 1200 - 20  # non-eval documents; 1/3 of them unscored
    assert rows["top"] == round(0.2 * n) and abs(rows["rand"] - 0.2 * n) < 4 * (n * 0.16) ** 0.5
    assert rows["most"] == round(0.9 * n)
    warned = [ln for ln in res.stderr.splitlines() if "have no 'score' score" in ln]
    assert len(warned) == 2 and all(" of 1,180 non-eval documents" in w for w in warned)
    assert "arm 'top'" in warned[0] + warned[1] and "took 0 of them" in " ".join(warned)


def test_all_null_texts_say_so(tmp_path: Path) -> None:
    d = tmp_path / "pool"
    make_pool(d, 300, n_files=1)
    set_column(d / "part-000.parquet", "text", pa.array([None] * 300, pa.string()))
    line = assert_refused(prepare(exp_file(tmp_path, d)), "arm 'rand'", "null or empty text", "pool.text_column")
    assert "ratio" not in line
    assert_nothing_written(tmp_path)
    (tmp_path / "again").mkdir()
    exp = no_id(exp_file(tmp_path / "again", d))
    line = assert_refused(prepare(exp), "all 300 texts in column 'text' are null or empty")
    assert "ratio" not in line


def test_disk_full_names_the_path_and_the_size_and_removes_stage_files(tmp_path: Path) -> None:
    """ENOSPC on a real (tiny) tmpfs: one line with the place and the size needed; no stage files,
    partial dirs or data dirs left."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}); CI runs this as root")
    try:
        make_pool(tmp_path / "pool", 6000, n_files=3, seed=2)
        p = tmp_path / "exp.toml"
        p.write_text(experiment_toml(small / "wd", str(tmp_path / "pool"), arms=RANDOM_ARM, eval_docs=20))
        line = assert_refused(prepare(p), "disk full while preparing", "needs about", "MB", "free space")
        assert line.split("armlab: error: ")[1].startswith(str(small / "wd")), line
        wd = small / "wd"
        assert not list((wd / "cache" / "prepare").glob("stage-*")), "stage files removed"
        assert not [q for q in wd.rglob("*") if ".partial" in q.name or q.name.endswith(".tmp")]
        assert not (wd / "arms" / "rand" / "data" / "manifest.json").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- a pool file re-scored in place at the same size ------------------------------------------------
def stable_pool(d: Path) -> list[Path]:
    """Files written so that new scores keep each file's size (no dictionary, no compression)."""
    paths = make_pool(d, 1200, n_files=3, seed=5)
    for p in paths:
        pq.write_table(pq.read_table(p), p, row_group_size=200, use_dictionary=False, compression="none")
    return paths


def rescore(path: Path) -> None:
    size = path.stat().st_size
    t = pq.read_table(path)
    neg = pa.compute.negate(t.column("score"))
    t = t.set_column(t.schema.get_field_index("score"), "score", neg)
    pq.write_table(t, path, row_group_size=200, use_dictionary=False, compression="none")
    assert path.stat().st_size == size


def arm_shards(wd: Path, arm: str) -> list[str]:
    from armlab.data.shards import sha256_file, shard_paths

    return [sha256_file(p) for p in shard_paths(wd / "arms" / arm / "data")]


def clean_run(tmp: Path, pool: Path) -> Path:
    """A fresh workdir prepared from a copy of `pool` as it is now."""
    import shutil

    (tmp / "clean").mkdir()
    shutil.copytree(pool, tmp / "clean" / "pool")
    exp = exp_file(tmp / "clean", tmp / "clean" / "pool", arms=RANDOM_ARM + TOP_ARM)
    assert prepare(exp).returncode == 0
    return tmp / "clean" / "wd"


def test_rescored_file_after_a_finished_prepare_is_named_and_reprepared(tmp_path: Path) -> None:
    paths = stable_pool(tmp_path / "pool")
    exp = exp_file(tmp_path, tmp_path / "pool", arms=RANDOM_ARM + TOP_ARM)
    assert prepare(exp).returncode == 0
    old_top = arm_shards(tmp_path / "wd", "top")
    rescore(paths[1])
    assert_refused(prepare(exp), "part-001.parquet changed since it was prepared", "--overwrite")
    res = prepare(exp, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert arm_shards(tmp_path / "wd", "top") != old_top
    assert arm_shards(tmp_path / "wd", "top") == arm_shards(clean_run(tmp_path, tmp_path / "pool"), "top")


def test_rescored_file_between_a_kill_and_the_rerun_is_read_again(tmp_path: Path) -> None:
    """Killed after its text pass (keys and done units on disk), the pool file re-scored, then
    the rerun: it says which file changed, reads its keys again, and gives a clean run's shards."""
    import signal

    paths = stable_pool(tmp_path / "pool")
    exp = exp_file(tmp_path, tmp_path / "pool", arms=RANDOM_ARM + TOP_ARM)
    pause = tmp_path / "pause"
    pause.mkdir()
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(exp), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "ARMLAB_TEST_PAUSE": f"swap:{pause}"})  # fmt: skip
    deadline = time.time() + 60
    while not list(pause.glob("*.paused")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((tmp_path / "wd" / "cache" / "prepare").glob("stage-*/done/*.json")), "killed after the text pass"
    rescore(paths[1])
    res = prepare(exp)
    assert res.returncode == 0, res.stderr
    assert "part-001.parquet changed since the interrupted prepare" in res.stderr
    clean = clean_run(tmp_path, tmp_path / "pool")
    for arm in ("rand", "top"):
        assert arm_shards(tmp_path / "wd", arm) == arm_shards(clean, arm), arm
