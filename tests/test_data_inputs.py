"""Bad input and safety refusals through the real CLI: one line naming the culprit, exit 2,
no traceback, nothing half-written. Also the fetch cache (retries, bounded prefetch)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from armlab.data.pool import PoolFile, Prefetcher, fetch_file, list_pool
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec
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
    """A local filesystem whose downloads fail the first `failures` times (a dropped connection)."""

    protocol = "flaky"
    failures = 0
    calls = 0
    in_cache_max = 0
    cache_dir: Path | None = None

    def get_file(self, rpath, lpath, **kw):  # noqa: ANN001
        FlakyFS.calls += 1
        if FlakyFS.cache_dir is not None:
            n = len([p for p in FlakyFS.cache_dir.rglob("*.parquet")])
            FlakyFS.in_cache_max = max(FlakyFS.in_cache_max, n)
        if FlakyFS.failures > 0:
            FlakyFS.failures -= 1
            Path(lpath).write_bytes(b"partial")
            raise ConnectionError("connection reset by peer")
        return super().get_file(rpath, lpath, **kw)


@pytest.fixture
def flaky() -> type[FlakyFS]:
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    FlakyFS.failures, FlakyFS.calls, FlakyFS.in_cache_max, FlakyFS.cache_dir = 0, 0, 0, None
    return FlakyFS


def test_fetch_retries_then_fails_naming_the_file(pool: Path, tmp_path: Path, flaky: type[FlakyFS]) -> None:
    files = list_pool(PoolSpec(uri=f"flaky://{pool}"))
    assert [f.remote for f in files] == [True] * 3
    flaky.failures = 2
    got = fetch_file(files[0], tmp_path / "cache", retries=3, backoff=0.0)
    assert got.read_bytes() == (pool / "part-000.parquet").read_bytes() and flaky.calls == 3
    assert not list(got.parent.glob(".*.tmp"))
    flaky.failures = 10
    with pytest.raises(ArmlabError, match=r"part-001\.parquet: download failed after 3 attempts"):
        fetch_file(files[1], tmp_path / "cache", retries=2, backoff=0.0)
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
    pf = Prefetcher(files, list(range(len(files))), cache, ahead=2, retries=0)
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
