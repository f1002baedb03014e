"""Column-pruned reads of remote parquet, end to end over a real HTTP server on loopback:
the shards equal a local prepare's, only the needed column chunks are sent, dropped
connections are retried, a server that ignores Range makes prepare fall back to whole files
(saying so once), and a SIGKILLed prepare resumes without fetching its finished units again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from armlab.data.pool import PoolFile, iter_columns, list_pool
from armlab.data.ranged import KnownRanges, OutsideFetched, RemoteParquet, chunk_spans
from armlab.spec import PoolSpec
from data_util import experiment_toml, make_pool
from http_util import NoRangeServer, PoolServer, widen
from test_data_prepare import all_shas

pytestmark = pytest.mark.e2e

FAST_RETRIES = {"ARMLAB_NET_ATTEMPTS": "4", "ARMLAB_NET_BACKOFF": "0.05"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 files of 4 row groups, ~1.3 KB a row of which 1 KB is a column no pass reads."""
    d = tmp_path_factory.mktemp("wide") / "pool"
    widen(make_pool(d, 4000, n_files=4, row_groups_per_file=4, seed=3, empty_every=101))
    return d


def file_bytes(pool: Path) -> int:
    return sum(p.stat().st_size for p in pool.glob("*.parquet"))


def remote_exp(tmp: Path, name: str, uri: str, fetch: str = "columns") -> Path:
    """`<tmp>/<name>/exp.toml`: the test experiment over `uri` with `[pool] fetch`, workdir beside it."""
    d = tmp / name
    d.mkdir()
    text = experiment_toml(d / "wd", uri).replace("[eval]", f'fetch = "{fetch}"\n\n[eval]', 1)
    (d / "exp.toml").write_text(text)
    return d / "exp.toml"


def prepare_at(tmp: Path, name: str, uri: str, fetch: str = "columns", *args: str, env: dict | None = None):
    exp = remote_exp(tmp, name, uri, fetch)
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(exp), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **(env or {})})
    return res, exp.parent / "wd"


SOURCE_FIELDS = ("fingerprint", "pool_fingerprint", "pool_files")  # name the pool's URI: differ by design


def same_outputs(a: Path, b: Path) -> None:
    """Shards byte-identical; manifests identical but for the fields that name the source."""
    sa, sb = all_shas(a), all_shas(b)
    assert sa.keys() == sb.keys()
    for target in sa:
        assert {k: v for k, v in sa[target].items() if k != "manifest.json"} == {
            k: v for k, v in sb[target].items() if k != "manifest.json"
        }, target
    for ma in a.rglob("manifest.json"):
        mb = b / ma.relative_to(a)
        ja, jb = json.loads(ma.read_text()), json.loads(mb.read_text())
        for k in SOURCE_FIELDS:
            ja.pop(k, None), jb.pop(k, None)
        assert ja == jb, ma


@pytest.fixture(scope="module")
def local(pool: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    res, wd = prepare_at(tmp_path_factory.mktemp("local"), "local", str(pool), "columns", "--workers", "2")
    assert res.returncode == 0, res.stderr
    return wd


def test_column_pruned_prepare_equals_local_and_sends_only_the_needed_columns(
    pool: Path, local: Path, tmp_path: Path
) -> None:
    with PoolServer(pool) as server:
        res, wd = prepare_at(tmp_path, "cols", f"{server.url}/", "columns", "--workers", "2")
        assert res.returncode == 0, res.stderr
        sent = server.log.sent
        ranged = [h for h in server.log.hits if h.method == "GET" and h.path.endswith(".parquet")]
    same_outputs(local, wd)
    # id/score/token_count for the key pass, text for the text pass, the footers: never `vec`
    assert sent < 0.4 * file_bytes(pool), (sent, file_bytes(pool))
    assert ranged and all(h.status == 206 for h in ranged)
    assert not (wd / "cache" / "pool").exists()  # nothing of the files was written to disk

    with PoolServer(pool) as server:
        res, wd = prepare_at(tmp_path, "files", f"{server.url}/", "files", "--workers", "2")
        assert res.returncode == 0, res.stderr
        assert server.log.sent >= file_bytes(pool)
    same_outputs(local, wd)
    assert not list((wd / "cache").rglob("*.parquet"))  # each download deleted after use


def test_a_row_group_read_fetches_only_its_column_chunks(pool: Path) -> None:
    with PoolServer(pool) as server:
        (pf, *_) = list_pool(PoolSpec(uri=f"{server.url}/"))
        server.log.clear()
        got = list(iter_columns(pf, ["text"]))
        hits = list(server.log.hits)
    md = pq.read_metadata(pool / "part-000.parquet")
    want = [pq.ParquetFile(pool / "part-000.parquet").read_row_group(i, columns=["text"]) for i in range(4)]
    assert [t.equals(w) for t, w in zip(got, want, strict=True)] == [True] * 4
    spans = [s for rg in range(md.num_row_groups) for s in chunk_spans(md, ["text"], rg, pf.size)]
    tail = min(pf.size, 64 << 10)
    assert sum(h.sent for h in hits) <= tail + sum(s.size for s in spans)
    assert all(h.range is not None for h in hits)


def test_reads_outside_the_fetched_ranges_fail_loudly() -> None:
    src = KnownRanges("x", 100)
    src.add(10, b"a" * 20)
    src.seek(12)
    assert src.read(5) == b"aaaaa"
    src.seek(25)
    with pytest.raises(OutsideFetched, match="bytes 25-35"):
        src.read(10)


def test_dropped_connections_mid_range_are_retried(pool: Path, local: Path, tmp_path: Path) -> None:
    with PoolServer(pool, drops=4, drop_after=5_000) as server:
        res, wd = prepare_at(
            tmp_path, "drops", f"{server.url}/", "columns", "--workers", "2", env=FAST_RETRIES
        )
        assert res.returncode == 0, res.stderr
        assert server.drops == 0  # every planned cut happened
    assert res.stderr.count("retrying in") >= 4
    same_outputs(local, wd)


def test_remote_footer_is_read_once_with_the_tail(pool: Path) -> None:
    with PoolServer(pool) as server:
        pf = PoolFile(
            f"{server.url}/part-001.parquet", (pool / "part-001.parquet").stat().st_size, "parquet", "http"
        )
        rf = RemoteParquet(pf)
        assert len(server.log.hits) == 1 and server.log.hits[0].range == (pf.size - (64 << 10), pf.size)
        assert rf.metadata.num_rows == 1000


def test_a_server_that_ignores_range_gets_whole_downloads_said_once(
    pool: Path, local: Path, tmp_path: Path
) -> None:
    with NoRangeServer(pool) as server:
        res, wd = prepare_at(tmp_path, "norange", f"{server.url}/", "columns", "--workers", "2")
        assert res.returncode == 0, res.stderr
    assert res.stderr.count("ignores HTTP Range requests") == 1, res.stderr
    same_outputs(local, wd)
    assert not list((wd / "cache").rglob("*.parquet"))


def test_sigkill_mid_fetch_then_rerun_does_not_refetch_finished_units(
    pool: Path, local: Path, tmp_path: Path
) -> None:
    names = sorted(p.name for p in pool.glob("*.parquet"))
    with PoolServer(pool, rate=2e6) as server:  # 2 MB/s: a few seconds of text pass
        d = tmp_path / "kill"
        d.mkdir()
        (d / "exp.toml").write_text(experiment_toml(d / "wd", f"{server.url}/"))
        cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(d / "exp.toml")]
        proc = subprocess.Popen(
            [*cmd, "--workers", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        done: list[Path] = []
        deadline = time.time() + 120
        while time.time() < deadline and not done:
            done = list((d / "wd" / "cache" / "prepare").glob("stage-*/done/*.json"))
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, mid-fetch
        proc.wait()
        assert done, proc.stderr.read() if proc.stderr else ""
        finished = {names[int(p.stem)] for p in (d / "wd" / "cache" / "prepare").glob("stage-*/done/*.json")}
        assert 0 < len(finished) < len(names)

        server.rate = None
        server.log.clear()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr
        for name in finished:  # a HEAD to list it, and at most the 8-byte Range probe of the pool
            assert server.log.file_bytes(name) <= 8, (name, server.log.file_bytes(name))
        for name in set(names) - finished:
            assert server.log.file_bytes(name) > 0
    same_outputs(local, d / "wd")


def test_a_server_that_keeps_dropping_is_one_line_naming_the_file(pool: Path, tmp_path: Path) -> None:
    from test_data_prepare import assert_refused

    env = {"ARMLAB_NET_ATTEMPTS": "2", "ARMLAB_NET_BACKOFF": "0.05"}
    with PoolServer(pool, drops=10_000, drop_after=5_000) as server:
        res, wd = prepare_at(tmp_path, "dead", f"{server.url}/", "columns", "--workers", "2", env=env)
    line = assert_refused(res, f"{server.url}/part-00", "cannot reach 127.0.0.1 after 2 attempts")
    assert "rerun the same command to resume" in line
    assert not (wd / "eval").exists() and not list(wd.glob("arms/*/data"))
