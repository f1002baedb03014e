"""`armlab score --executor ray` and a prepare selecting on its scores, on the real two-node Ray
cluster of tests/ray_util.py: sidecars and shards byte-identical to a local score + prepare; a
scoring actor's process killed in the middle of a unit is restarted by Ray, its unit run again,
and the scores are still the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_util import all_shas
from ray_util import HEAD_IP, NODE2_IP, RayCluster
from score_util import demo_documents, make_head, make_scored_pool, train_fasttext
from test_data_score_run import experiment as scorer_experiment

EDU = '[[arms]]\nname = "edu"\nkind = "top"\nratio = 0.3\nscore = "ft"\n'


def experiment(root: Path, wd: Path) -> Path:
    return scorer_experiment(root, arms=EDU, name=f"{wd.name}.toml", workdir=wd)


# One cluster per xdist worker (the session fixture): every Ray test on the same worker (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("ray")


def cli(*args: str | Path, env: dict[str, str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(*args: str | Path, env: dict[str, str]) -> str:
    proc = cli(*args, env=env)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return err


def sidecars(wd: Path) -> dict[str, str]:
    scores = wd / "scores"
    return {str(p.relative_to(scores)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(scores.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The pool and models, and a local score + prepare of them (what every Ray run must equal)."""
    root = tmp_path_factory.mktemp("scoreray")
    good, junk = demo_documents(n_junk=120)
    make_scored_pool(root / "pool", good[:360], junk[:90])
    train_fasttext(root / "quality.bin", good[360:], junk[90:])
    make_head(root / "head.safetensors", dim=8, hidden=4)
    env = {**os.environ, "ARMLAB_PROGRESS_EVERY": "0", "ARMLAB_CACHE": str(root / "cache")}
    exp = experiment(root, root / "wd")
    run("score", exp, "--workers", "2", env=env)
    run("prepare", exp, "--workers", "2", env=env)
    return {"root": root, "env": env, "sidecars": sidecars(root / "wd"), "shards": all_shas(root / "wd")}


def test_score_and_prepare_on_ray_are_byte_identical_to_local(
    ray_cluster: RayCluster, local: dict, tmp_path: Path
) -> None:
    exp = experiment(local["root"], tmp_path / "wd")
    on_ray = ("--executor", "ray", "--ray-address", ray_cluster.address)
    err = run("score", exp, *on_ray, env=local["env"])
    assert "score ft: 2 pool files, 450 docs" in err, err
    last = [ln for ln in err.splitlines() if ln.startswith("score ft: ") and "per node: " in ln][-1]
    assert f"{HEAD_IP} " in last and f"{NODE2_IP} " in last, last  # units ran on both nodes
    assert sidecars(tmp_path / "wd") == local["sidecars"]
    run("prepare", exp, *on_ray, env=local["env"])
    got = all_shas(tmp_path / "wd")
    assert got["edu"].pop("manifest.json") != local["shards"]["edu"]["manifest.json"]  # it names its scores dir
    assert got == {**local["shards"], "edu": {k: v for k, v in local["shards"]["edu"].items() if k != "manifest.json"}}
    manifest = json.loads((tmp_path / "wd" / "arms" / "edu" / "data" / "manifest.json").read_text())
    assert manifest["scorer"]["dir"] == str(tmp_path / "wd" / "scores" / "ft")


def test_a_scoring_actor_killed_mid_unit_is_restarted_and_the_scores_are_identical(
    ray_cluster: RayCluster, local: dict, tmp_path: Path
) -> None:
    hook = tmp_path / "hook"
    hook.mkdir()
    exp = experiment(local["root"], tmp_path / "wd")
    env = {**local["env"], "ARMLAB_TEST_KILL": f"score:{hook}"}  # the first unit stops after a block
    proc = cli("score", exp, "--scorer", "ft", "--executor", "ray", "--ray-address", ray_cluster.address, env=env)
    deadline = time.monotonic() + 300
    while not (hook / "pid").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    victim = int((hook / "pid").read_text())
    os.kill(victim, signal.SIGKILL)  # the actor's process, holding the model, mid-unit
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    arrivals = [int(x) for x in (hook / "arrivals").read_text().split()]
    assert victim in arrivals and arrivals[-1] != victim, arrivals  # a new process ran the unit again
    want = {k: v for k, v in local["sidecars"].items() if k.startswith("ft/")}
    assert sidecars(tmp_path / "wd") == want
