"""`armlab plan` on a remote pool: the bytes prepare will fetch in each fetch mode, from the
footers (ranged reads), equal to what a prepare then really fetches from the server."""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.data.plan import download_plan
from armlab.spec import load_experiment
from data_util import make_pool
from http_util import NoRangeServer, PoolServer, widen
from test_data_prepare import assert_refused, cli
from test_data_ranged import prepare_at, remote_exp

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("plan") / "pool"
    widen(make_pool(d, 2400, n_files=3, row_groups_per_file=3, seed=9), 800)
    return d


def parquet_bytes(server: PoolServer) -> int:
    return sum(h.sent for h in server.log.hits if h.method == "GET" and h.path.endswith(".parquet"))


def test_plan_predicts_the_bytes_prepare_fetches(pool: Path, tmp_path: Path) -> None:
    size = sum(p.stat().st_size for p in pool.glob("*.parquet"))
    for mode in ("columns", "files"):
        with PoolServer(pool) as server:
            res, _ = prepare_at(tmp_path, f"plan-{mode}", f"{server.url}/", mode, "--workers", "2")
            assert res.returncode == 0, res.stderr
            server.log.clear()
            d = download_plan(load_experiment(tmp_path / f"plan-{mode}" / "exp.toml"))
            planned = parquet_bytes(server)
            server.log.clear()
            (tmp_path / f"plan-{mode}" / "wd").rename(tmp_path / f"plan-{mode}" / "old")
            res = cli("prepare", tmp_path / f"plan-{mode}" / "exp.toml", "--workers", "2")
            assert res.returncode == 0, res.stderr
            fetched = parquet_bytes(server) - 8  # less the Range probe
        assert d is not None and d.mode == mode and d.files == 3 and d.file_bytes == size
        # exact, but for a footer a worker may still hold from the key pass (the plan counts two)
        assert d.fetched(mode) - 3 * (64 << 10) <= fetched <= d.fetched(mode), (mode, d, fetched)
        assert planned < 0.2 * size  # planning reads the footers only
    assert d.fetched("columns") < 0.6 * size < size < d.fetched("files")
    assert d.seconds("files", 8.0) == pytest.approx(d.fetched("files") / 1e6)  # 8 Mbit/s = 1 MB/s


def test_plan_prints_the_download_at_the_link_speed(pool: Path, tmp_path: Path) -> None:
    with PoolServer(pool) as server:
        out = cli("plan", remote_exp(tmp_path, "p", f"{server.url}/"), "--link-mbps", "0.8")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if "fetch =" in ln or ln.startswith("download")]
    assert lines[0].startswith("download: 3 remote files")
    assert lines[1].startswith('  fetch = "columns"') and "(chosen" in lines[1] and "at 1 Mbit/s" in lines[1]
    assert lines[2].startswith('  fetch = "files"') and "x the files" in lines[2]
    with NoRangeServer(pool) as server:
        out = cli("plan", remote_exp(tmp_path, "n", f"{server.url}/"))
    # the footers cannot be read without the whole files: one line saying so, not a 1.6 TB plan
    assert_refused(out, "part-000.parquet", "ignores HTTP Range", "`armlab prepare` works")


def test_a_local_pool_has_no_download(pool: Path, tmp_path: Path) -> None:
    assert download_plan(load_experiment(remote_exp(tmp_path, "l", str(pool)))) is None
