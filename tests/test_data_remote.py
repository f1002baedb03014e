"""Remote pools through the real clients: the hub path (huggingface_hub's HfFileSystem against a
local server answering the hub's routes), and network errors as one line naming the URL, after
retries, with no credential in any output."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_util import experiment_toml, make_pool
from http_util import HubServer, PoolServer, widen
from test_data_prepare import assert_refused, cli
from test_data_ranged import prepare_at, same_outputs

pytestmark = pytest.mark.e2e

FAST_RETRIES = {"ARMLAB_NET_ATTEMPTS": "2", "ARMLAB_NET_BACKOFF": "0.05"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def hub_env(server: HubServer) -> dict[str, str]:
    return {"HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset repo: parquet under data/ and data/extra/, plus files the glob must not take."""
    root = tmp_path_factory.mktemp("hub") / "repo"
    paths = make_pool(root / "data", 1500, n_files=2, row_groups_per_file=3, seed=4)
    paths += make_pool(root / "data" / "extra", 1500, n_files=2, row_groups_per_file=3, seed=5)
    widen(paths, 400)
    (root / "README.md").write_text("# a dataset card\n")
    (root / "data" / "notes.json").write_text("{}\n")
    return root


def test_hub_pool_lists_reads_ranges_and_fingerprints_by_oid(repo: Path, tmp_path: Path) -> None:
    local_pool = tmp_path / "local"
    for p in sorted((repo / "data").rglob("*.parquet")):
        dest = local_pool / p.relative_to(repo / "data")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(p.read_bytes())
    res, local = prepare_at(tmp_path, "local-prep", str(local_pool), "columns", "--workers", "2")
    assert res.returncode == 0, res.stderr

    with HubServer(repo, page_size=2) as server:
        res, wd = prepare_at(
            tmp_path,
            "hub",
            "hf://datasets/armlab/pool/data/**/*.parquet",
            "columns",
            "--workers",
            "2",
            env=hub_env(server),
        )
        assert res.returncode == 0, res.stderr
        hits = list(server.log.hits)
        # the listing and identities, as the prepare process sees them
        script = (
            "import json; from armlab.data.pool import list_pool; from armlab.spec import PoolSpec; "
            "print(json.dumps([[f.name, f.size, f.identity] "
            "for f in list_pool(PoolSpec(uri='hf://datasets/armlab/pool/data/**/*.parquet'))]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env={**os.environ, **hub_env(server)},
        )
        assert out.returncode == 0, out.stderr
    same_outputs(local, wd)
    listed = json.loads(out.stdout)
    assert [n for n, _, _ in listed] == [
        f"hf://datasets/armlab/pool/data/{p}"
        for p in ("extra/part-000.parquet", "extra/part-001.parquet", "part-000.parquet", "part-001.parquet")
    ]
    for name, size, identity in listed:
        data = (repo / "data" / name.split("/data/", 1)[1]).read_bytes()
        assert size == len(data) and identity == f"sha256:{hashlib.sha256(data).hexdigest()}"
    # what the arms were derived from, in their manifests (and so in the pool fingerprint)
    manifest = json.loads((wd / "arms" / "rand" / "data" / "manifest.json").read_text())
    assert manifest["pool_files"] == listed
    tree = [h for h in hits if "/tree/" in h.path]
    assert len(tree) >= 3  # the listing followed the Link-header pagination (2 entries a page)
    reads = [h for h in hits if "/resolve/" in h.path]
    assert reads and all(h.status == 206 for h in reads)  # ranged reads only, never a whole file
    sent = sum(h.sent for h in reads)
    assert sent < 0.7 * sum(p.stat().st_size for p in (repo / "data").rglob("*.parquet"))


def test_hub_file_changed_on_the_server_changes_its_identity(repo: Path, tmp_path: Path) -> None:
    script = (
        "from armlab.data.pool import list_pool; from armlab.spec import PoolSpec; "
        "print(list_pool(PoolSpec(uri='hf://datasets/armlab/pool/data/part-000.parquet'))[0].identity)"
    )
    copy = tmp_path / "repo"
    make_pool(copy / "data", 300, n_files=1, seed=1)
    with HubServer(copy) as server:
        env = {**os.environ, **hub_env(server)}
        before = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        make_pool(copy / "data", 300, n_files=1, seed=2)  # re-exported in place
        after = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    assert before.stdout.startswith("sha256:") and before.stdout != after.stdout


def exp_at(tmp: Path, uri: str) -> Path:
    p = tmp / "exp.toml"
    p.write_text(experiment_toml(tmp / "wd", uri))
    return p


def run_with(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_hub_unreachable_is_one_line_after_retries(tmp_path: Path) -> None:
    port = closed_port()
    env = {
        "HF_ENDPOINT": f"http://bob:hunter2-secret@127.0.0.1:{port}",
        "HF_HUB_OFFLINE": "0",
        **FAST_RETRIES,
    }
    res = run_with(env, "prepare", exp_at(tmp_path, "hf://datasets/armlab/pool/data/*.parquet"))
    line = assert_refused(
        res, "hf://datasets/armlab/pool/data/*.parquet", "cannot reach 127.0.0.1", "after 2 attempts"
    )
    assert "retrying" in res.stderr and "hunter2-secret" not in res.stderr + res.stdout, line
    assert not (tmp_path / "wd" / "eval").exists()


def test_hub_offline_mode_is_one_line(tmp_path: Path) -> None:
    res = run_with(
        {"HF_HUB_OFFLINE": "1"}, "prepare", exp_at(tmp_path, "hf://datasets/armlab/pool/data/*.parquet")
    )
    assert_refused(res, "hf://datasets/armlab/pool", "HF_HUB_OFFLINE")


def test_http_errors_are_one_line_and_never_show_the_userinfo(tmp_path: Path) -> None:
    port = closed_port()
    res = run_with(
        FAST_RETRIES, "prepare", exp_at(tmp_path, f"http://bob:hunter2-secret@127.0.0.1:{port}/pool/")
    )
    assert_refused(res, "http://***@127.0.0.1", "cannot reach 127.0.0.1 after 2 attempts")
    assert "hunter2-secret" not in res.stderr + res.stdout

    make_pool(tmp_path / "pool", 200, n_files=1)
    with PoolServer(tmp_path / "pool") as server:
        res = cli("prepare", exp_at(tmp_path, f"{server.url}/missing.parquet"))
    assert_refused(res, f"{server.url}/missing.parquet", "not found")
