"""`armlab prepare --executor ray` on a real two-node Ray cluster on loopback (tests/ray_util.py).

The shards (and manifests) must be byte-identical to a local prepare of the same pool, the units
must reach both nodes (the per-node progress says which node ran what), a worker process killed
in the middle of a unit must be retried by Ray with the output still identical, and a workdir one
node cannot see must be refused before anything is written.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from data_util import all_shas, experiment_toml, make_pool
from ray_util import HEAD_IP, NODE2_IP, RayCluster

N_DOCS, FILES, EVAL_DOCS = 3000, 6, 100

# One cluster per xdist worker (the session fixture): every Ray test on the same worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ARMLAB_PROGRESS_EVERY": "0", **(env or {})},
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def write_exp(tmp: Path, pool: Path, wd: Path) -> Path:
    p = tmp / "exp.toml"
    p.write_text(experiment_toml(wd, str(pool), eval_docs=EVAL_DOCS))
    return p


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pool, and its shards from a local prepare (the reference every Ray run must equal)."""
    tmp = tmp_path_factory.mktemp("local")
    make_pool(tmp / "pool", N_DOCS, n_files=FILES, row_groups_per_file=3, seed=11)
    rc, err = finish(cli("prepare", write_exp(tmp, tmp / "pool", tmp / "wd"), "--workers", "2"))
    assert rc == 0, err
    return {"pool": tmp / "pool", "shas": all_shas(tmp / "wd")}


def ray_prepare(cluster: RayCluster, exp: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return cli("prepare", exp, "--executor", "ray", "--ray-address", cluster.address, env=env)


def test_prepare_on_ray_is_byte_identical_to_local_and_runs_on_both_nodes(
    ray_cluster: RayCluster, local: dict, tmp_path: Path
) -> None:
    rc, err = finish(ray_prepare(ray_cluster, write_exp(tmp_path, local["pool"], tmp_path / "wd")))
    assert rc == 0, err
    assert all_shas(tmp_path / "wd") == local["shas"]
    # every pass's last progress line: the per-node figures name both nodes
    for step in ("key pass", "select + route"):
        last = [ln for ln in err.splitlines() if ln.startswith(f"{step}: ")][-1]
        assert "per node: " in last and f"{HEAD_IP} " in last and f"{NODE2_IP} " in last, last
        assert "docs/s" in last and "MB/s" in last, last
    assert not list((tmp_path / "wd").rglob(".armlab-ray-probe-*")), "the shared-storage probes are removed"


def test_a_worker_killed_mid_unit_is_retried_and_the_shards_are_identical(
    ray_cluster: RayCluster, local: dict, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    proc = ray_prepare(
        ray_cluster,
        write_exp(tmp_path, local["pool"], tmp_path / "wd"),
        env={"ARMLAB_TEST_KILL": f"text:{hook}"},  # the first text unit stops with one stage file written
    )
    deadline = time.monotonic() + 240
    while not (hook / "pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1]
        time.sleep(0.05)
    victim = int((hook / "pid").read_text())
    stage = next((tmp_path / "wd").rglob("stage-*"))
    written = {p.stem for p in stage.glob("*/*.arrow")}
    assert written - {p.stem for p in stage.glob("done/*.json")}, "killed with a unit half done"
    os.kill(victim, signal.SIGKILL)  # a Ray worker process, running the unit
    rc, err = finish(proc)
    assert rc == 0, err
    arrivals = [int(x) for x in (hook / "arrivals").read_text().split()]
    assert victim in arrivals and len(arrivals) > 1 and arrivals[-1] != victim, arrivals  # the unit ran again
    assert all_shas(tmp_path / "wd") == local["shas"]


def test_a_workdir_one_node_cannot_see_is_refused_before_anything_is_written(
    ray_cluster: RayCluster, local: dict
) -> None:
    if ray_cluster.private is None:
        pytest.skip("unshare -m is not permitted here, so no node can be made not to see a directory")
    wd = ray_cluster.private / "wd"
    exp = write_exp(ray_cluster.private, local["pool"], wd)
    rc, err = finish(ray_prepare(ray_cluster, exp))
    assert rc == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("armlab: error: ") and f"Ray node {NODE2_IP} does not see {ray_cluster.private}" in line
    assert "filesystem every node mounts" in line, line
    assert sorted(p.name for p in ray_cluster.private.iterdir()) == ["exp.toml"]  # no workdir, no probe left


def test_a_stopped_prepare_on_ray_ends_its_units_and_the_rerun_resumes(
    ray_cluster: RayCluster, local: dict, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    exp = write_exp(tmp_path, local["pool"], tmp_path / "wd")
    proc = ray_prepare(ray_cluster, exp, env={"ARMLAB_TEST_KILL": f"text:{hook}"})
    deadline = time.monotonic() + 240
    while not (hook / "pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, finish(proc)[1]
        time.sleep(0.05)
    unit = psutil.Process(int((hook / "pid").read_text()))  # a Ray worker, in the middle of a unit
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc)
    assert rc == 130 and "prepare stopped (SIGTERM); rerun to resume" in err, err
    assert "Traceback" not in err, err
    unit.wait(timeout=60)  # the unit's worker is ended with the run, not left writing
    rc, err = finish(ray_prepare(ray_cluster, exp))
    assert rc == 0, err
    assert all_shas(tmp_path / "wd") == local["shas"]
