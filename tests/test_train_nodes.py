"""Multi-node runs in the train layer: `armlab train --nnodes N --node-rank K --rdzv-endpoint HOST:PORT`.

Two "nodes" on loopback: two real `armlab train` processes, each a supervisor with its own
torchrun of one gloo rank, meeting at node 0's endpoint (static rendezvous). Their weights after 8
steps equal a one-node two-rank run's bitwise; node 0 owns state.json, metrics and checkpoints,
node 1 keeps its own log; a stop that reaches node 1 only stops both at the same step, with node
0's checkpoint. The flags' refusals are checked in-process (nothing starts, nothing is written).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from armlab import runs
from armlab.errors import ArmlabError
from armlab.train import checkpoint
from armlab.train.plan import TrainOptions, plan_run
from train_util import (
    ARM,
    armlab,
    build_workdir,
    experiment,
    run_dir,
    spawn,
    train_losses,
    unused_port,
    wait_for,
)

pytestmark = pytest.mark.e2e

STEPS = ("--device", "cpu", "--num-iterations", "8")


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("nodes"))


def two_nodes(exp_file: Path, run: str, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    endpoint = f"127.0.0.1:{unused_port()}"
    return [
        spawn("train", str(exp_file), "--arm", ARM, *STEPS, "--run-name", run, "--nnodes", "2",
              "--node-rank", str(k), "--rdzv-endpoint", endpoint, env=env)  # fmt: skip
        for k in (0, 1)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[tuple[int, str, str]]:
    try:
        return [(p.wait(timeout), p.stdout.read(), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def weights(d: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint.checkpoint_dir(d, step) / "model.pt")


def test_two_nodes_of_one_rank_train_bitwise_as_one_node_of_two(exp_file: Path) -> None:
    one = armlab("train", str(exp_file), "--arm", ARM, *STEPS, "--nproc", "2", "--run-name", "one-node")
    assert one.returncode == 0, one.stderr[-2000:]
    procs = two_nodes(exp_file, "two-nodes")
    (rc0, out0, err0), (rc1, out1, err1) = finish(procs)
    assert (rc0, rc1) == (0, 0), err0[-2000:] + err1[-2000:]
    a, b = run_dir(exp_file, "one-node"), run_dir(exp_file, "two-nodes")
    wa, wb = weights(a, 8), weights(b, 8)
    assert max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) == 0.0
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and train_losses(a) == train_losses(b)
    # node 0 owns the run dir; node 1 has its own plan and log, and wrote no state
    state = runs.read_run_state(b)
    assert state.state == "done" and state.pid == procs[0].pid
    assert (b / "plan.node1.json").is_file() and "node 1 of 2 of run two-nodes: ranks 1..1" in (
        b / "train.node1.log"
    ).read_text()
    assert "train two-nodes: arm rand, 2 x cpu on 2 nodes" in out0 and "step 00008/00008" not in out1


def test_a_stop_that_reaches_one_node_stops_both_at_one_step(exp_file: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    procs = two_nodes(exp_file, "stop-nodes", {"ARMLAB_TEST_PAUSE_STEP": "3", "ARMLAB_TEST_PAUSE_FILE": str(go)})
    d = run_dir(exp_file, "stop-nodes")
    try:
        wait_for(lambda: max(train_losses(d), default=0) >= 3, timeout=150, what="step 3")
        os.kill(procs[1].pid, signal.SIGTERM)  # node 1's supervisor only
        wait_for(lambda: (d / runs.STOP_REQUEST).exists(), timeout=30, what="node 1's stop request")
        go.touch()
    finally:
        results = finish(procs)
    (rc0, _, err0), (rc1, _, err1) = results
    assert (rc0, rc1) == (130, 130), err0[-2000:] + err1[-2000:]
    assert "run 'stop-nodes' stopped at step 3 by SIGTERM; checkpoint step 3 is saved" in err0
    assert "node 1 of run 'stop-nodes' stopped with the run at step 3" in err1
    state = runs.read_run_state(d)
    assert (state.state, state.resume_step) == ("stopped", 3) and checkpoint.list_steps(d) == [3]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(nnodes=2, node_rank=0), r"--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
        (dict(nnodes=2, rdzv_endpoint="127.0.0.1:29400"), r"--nnodes 2 needs --node-rank K"),
        (dict(nnodes=2, node_rank=2, rdzv_endpoint="127.0.0.1:29400"), r"--node-rank 2: must be in 0..1"),
        (dict(nnodes=2, node_rank=1, rdzv_endpoint="node0"), r"--rdzv-endpoint 'node0': use HOST:PORT"),
        (dict(node_rank=1), r"--node-rank and --rdzv-endpoint are for a multi-node run"),
        (dict(nnodes=2, node_rank=1, rdzv_endpoint="h:1", master_port=29500), r"--master-port is for one node"),
    ],
)
def test_bad_node_flags_are_refused_before_anything_is_written(exp_file: Path, options: dict, message: str) -> None:
    d = run_dir(exp_file, "flags")
    with pytest.raises(ArmlabError, match=message):
        plan_run(experiment(exp_file), ARM, TrainOptions(run_name="flags", device="cpu", **options))
    assert not d.exists()


def test_the_node_rank_comes_from_slurm(exp_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_NODEID", "1")
    options = TrainOptions(run_name="slurm", device="cpu", nnodes=2, rdzv_endpoint="127.0.0.1:29400")
    plan = plan_run(experiment(exp_file), ARM, options)
    assert (plan.node_rank, plan.follower, plan.world_size, plan.nproc_per_node) == (1, True, 2, 1)
    assert plan.plan_file.name == "plan.node1.json" and not (plan.run_dir / runs.RUN_JSON).exists()
