"""The storage seam over HTTP, against real servers on loopback: a pool file replaced between
listing and reading is refused (and a rerun lists it again), a server that accepts and never
answers is said within ARMLAB_NET_TIMEOUT, a token in a pool URL reaches no file and no output,
and a full disk during a download names the cache, the bytes needed and the bytes free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from armlab.data.pool import list_pool
from armlab.errors import ArmlabError
from armlab.scaffold import init_experiment
from armlab.spec import PoolSpec, load_experiment
from data_util import experiment_toml, make_pool
from http_util import PoolServer, SilentServer, etag, widen
from test_data_prepare import assert_refused

pytestmark = pytest.mark.e2e

FAST = {"ARMLAB_NET_ATTEMPTS": "2", "ARMLAB_NET_BACKOFF": "0.05"}


def armlab(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **FAST, **(env or {})}
    )


def write_exp(path: Path, workdir: Path, uri: str, fetch: str = "columns") -> Path:
    text = experiment_toml(workdir, uri).replace("[eval]", f'fetch = "{fetch}"\n\n[eval]', 1)
    path.write_text(text)
    return path


def shard_texts(data_dir: Path) -> set[str]:
    return {
        t for p in sorted(data_dir.glob("*.parquet")) for t in pq.read_table(p).column("text").to_pylist()
    }


@pytest.mark.parametrize("conditional", [True, False], ids=["if-match", "server-ignores-if-match"])
def test_a_pool_file_replaced_between_listing_and_reading_is_refused_then_listed_again(
    tmp_path: Path, conditional: bool
) -> None:
    pool = tmp_path / "pool"
    make_pool(pool, 900, n_files=3, seed=1)
    target = pool / "part-001.parquet"
    new = make_pool(tmp_path / "v2", 900, n_files=3, seed=2)[1].read_bytes()
    swapped: list[str] = []

    def reexport(path: Path) -> None:  # the first read of part-001 finds it rewritten in place
        if path == target and not swapped:
            st = target.stat()
            target.write_bytes(new)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new ETag even at one size
            swapped.append(etag(target))

    with PoolServer(pool, before_get=reexport, conditional=conditional) as server:
        exp = write_exp(tmp_path / "exp.toml", tmp_path / "wd", f"{server.url}/")
        res = armlab("prepare", exp, "--workers", "1")
        line = assert_refused(
            res, f"{server.url}/part-001.parquet", "changed on the server since it was listed"
        )
        assert "rerun" in line and swapped
        assert not (tmp_path / "wd" / "arms" / "rand" / "data" / "manifest.json").exists()

        res = armlab("prepare", exp, "--workers", "1")  # lists again: the new version, read whole
        assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "wd" / "arms" / "rand" / "data" / "manifest.json").read_text())
    listed = {n.rsplit("/", 1)[-1]: ident for n, _, ident in manifest["pool_files"]}
    assert listed["part-001.parquet"] == f"etag:{swapped[0].strip(chr(34))}"
    now = {t for p in pool.glob("*.parquet") for t in pq.read_table(p).column("text").to_pylist() if t}
    arms = shard_texts(tmp_path / "wd" / "arms" / "rand" / "data") | shard_texts(tmp_path / "wd" / "eval")
    assert arms <= now  # every document comes from the bytes the pool holds now


def test_a_server_that_never_answers_is_said_within_the_timeout(tmp_path: Path) -> None:
    with SilentServer() as server:
        url = f"{server.url}/pool/"
        res = armlab(
            "prepare",
            write_exp(tmp_path / "exp.toml", tmp_path / "wd", url),
            env={"ARMLAB_NET_TIMEOUT": "1"},
            timeout=60,
        )
    line = assert_refused(
        res, url, "no answer from 127.0.0.1 in 1 s (after 2 attempts)", "ARMLAB_NET_TIMEOUT"
    )
    assert "no answer in 1 s (attempt 1/2); retrying in 0.1s" in res.stderr, line  # the wait, as it happens
    assert not (tmp_path / "wd").exists()


def test_a_server_that_refuses_connections_is_unreachable_not_missing(tmp_path: Path) -> None:
    """fsspec's HTTP info turns a refused connection into FileNotFoundError: it was said "not
    found; check the URI" at once, when the URI was right and the server was down."""
    with SilentServer() as server:
        url = f"{server.url}/pool/part-000.parquet"
    # the server is gone: its port now refuses connections
    res = armlab("prepare", write_exp(tmp_path / "exp.toml", tmp_path / "wd", url), timeout=60)
    line = assert_refused(res, url, "cannot reach 127.0.0.1 after 2 attempts", "check the network")
    assert "not found" not in res.stderr and "(attempt 1/2); retrying" in res.stderr, line
    assert not (tmp_path / "wd").exists()


def test_a_token_in_a_pool_url_reaches_no_file_and_no_output(tmp_path: Path) -> None:
    token = "t0k3n-S3CR3T-2718"
    make_pool(tmp_path / "pool", 600, n_files=2)
    outputs: list[str] = []

    def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        res = armlab(*args, env=env)
        outputs.append(res.stdout + res.stderr)
        return res

    with PoolServer(tmp_path / "pool", token=token) as server:
        secret_url = f"{server.url.replace('http://', 'http://bob:pw-' + token + '@')}/?token={token}"
        res = run("prepare", write_exp(tmp_path / "a.toml", tmp_path / "wd-a", secret_url, fetch="files"))
        assert res.returncode == 0, res.stderr
        # the same secret named as ${VAR}: the files armlab writes keep the name, never the value
        named = write_exp(tmp_path / "b.toml", tmp_path / "wd-b", f"{server.url}/?token=${{POOL_TOKEN}}")
        res = run("prepare", named, env={"POOL_TOKEN": token})
        assert res.returncode == 0, res.stderr
        assert "token=${POOL_TOKEN}" in (tmp_path / "wd-b" / "experiment.toml").read_text()
        # in this process (the same code as the CLI's, without three more interpreters):
        init_experiment(tmp_path / "init.toml", secret_url)
        with pytest.raises(ArmlabError) as missing:
            list_pool(PoolSpec(uri=f"{server.url}/nope.parquet?token={token}"))
        # the workdir's frozen copy has no secret: reading the pool from it says why it cannot
        with pytest.raises(ArmlabError) as frozen:
            list_pool(load_experiment(tmp_path / "wd-a").pool)
    outputs += [str(missing.value), str(frozen.value)]
    assert f"{server.url}/nope.parquet?token=***: not found" in str(missing.value)
    assert "token=***: its secret was redacted" in str(frozen.value)
    assert "token=***" in (tmp_path / "wd-a" / "experiment.toml").read_text()
    assert "token=***" in (tmp_path / "init.toml").read_text()
    leaks = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and token.encode() in p.read_bytes()]
    leaks = [p for p in leaks if p.parent != tmp_path or p.suffix != ".toml" or p.name == "init.toml"]
    assert not leaks, leaks  # only the experiment files the user wrote hold it
    assert not [o for o in outputs if token in o]


def test_disk_full_during_a_download_names_the_cache_and_the_bytes(tmp_path: Path) -> None:
    """The pool's download cache on a 2 MB tmpfs (root mounts one; the test says why when it
    cannot), three ~1.3 MB files downloaded three at a time: whether the write fails (ENOSPC) or
    the check before it does, one line naming the cache dir, the bytes needed and the bytes free."""
    cache = tmp_path / "wd" / "cache" / "pool"
    cache.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(cache)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs at {cache} ({mounted.stderr.strip()}); the disk-full test needs root"
        )
    try:
        widen(make_pool(tmp_path / "pool", 3000, n_files=3, seed=4), 1000)
        with PoolServer(tmp_path / "pool") as server:
            exp = write_exp(tmp_path / "exp.toml", tmp_path / "wd", f"{server.url}/", fetch="files")
            res = armlab("prepare", exp, "--workers", "1")
            url = server.url
        line = assert_refused(res, f"{cache}: disk full downloading {url}/part-00", "MB more", "MB free")
        assert "free space there" in line
        assert not list(cache.rglob("*.part"))  # nothing half-written is kept
    finally:
        subprocess.run(["umount", str(cache)], check=True)
        shutil.rmtree(tmp_path / "wd", ignore_errors=True)


def test_download_file_is_verified_and_reused_while_the_version_holds(tmp_path: Path) -> None:
    """The one-file download others use (model weights, bundles): the bytes, then no second GET."""
    from armlab.store.download import download_file

    (src,) = make_pool(tmp_path / "srv", 300, n_files=1)
    dest = tmp_path / "models" / "m.parquet"
    with PoolServer(tmp_path / "srv") as server:
        assert download_file(f"{server.url}/{src.name}", dest).read_bytes() == src.read_bytes()
        server.log.clear()
        assert download_file(f"{server.url}/{src.name}", dest) == dest
        assert server.log.file_bytes(src.name) == 0  # one HEAD: still the version downloaded
        with pytest.raises(ArmlabError, match=r"/nope\.bin: not found"):
            download_file(f"{server.url}/nope.bin", tmp_path / "nope.bin")
    assert sorted(p.name for p in dest.parent.iterdir()) == [".armlab-blobs.json", "m.parquet"]
