"""armlab.train.stop: a stop loses nothing, whichever process it reaches.

Real `armlab train` runs (real torchrun, 2 gloo ranks on CPU). Each run pauses at the end of
step 5 (ARMLAB_TEST_PAUSE_STEP: the ranks wait for a file) so the signal lands at a known step,
not at whatever step a timer hits: the test waits for step 5's metrics line, signals, waits until
the signal has been taken in (the stop request, or the rank's own flag), then releases the ranks.
Checkpoints fall every 8 steps, so a checkpoint at step 5 is the stop's own ("checkpoint first").
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch

from armlab import runs
from armlab.train import checkpoint
from armlab.workdir import read_lease
from train_util import (
    ARM,
    armlab,
    build_workdir,
    data_dir,
    run_dir,
    spawn,
    train_losses,
    wait_for,
    worker_procs,
)

pytestmark = pytest.mark.e2e

QUICK = ("--device", "cpu", "--nproc", "2", "--num-iterations", "10")  # save_every 8: checkpoints 8, 10
ONE = ("--device", "cpu", "--num-iterations", "10")  # one rank: no torchrun
STOP_AT = 5


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("stop"))


@pytest.fixture(scope="module")
def uninterrupted(exp_file: Path) -> Path:
    r = armlab("train", str(exp_file), "--arm", ARM, *QUICK, "--run-name", "whole")
    assert r.returncode == 0, r.stderr[-2000:]
    return run_dir(exp_file, "whole")


def paused_run(
    exp_file: Path, run: str, tmp_path: Path, how: tuple[str, ...] = QUICK
) -> tuple[subprocess.Popen, Path, Path]:
    """Start a run that waits at the end of step STOP_AT until the returned file exists."""
    go = tmp_path / f"go-{run}"
    env = {"ARMLAB_TEST_PAUSE_STEP": str(STOP_AT), "ARMLAB_TEST_PAUSE_FILE": str(go)}
    proc = spawn("train", str(exp_file), "--arm", ARM, *how, "--run-name", run, env=env)
    d = run_dir(exp_file, run)
    wait_for(lambda: max(train_losses(d), default=0) >= STOP_AT, timeout=120, what=f"step {STOP_AT}")
    return proc, d, go


def rank_pid(d: Path, rank: int) -> int:
    for p in worker_procs(d):
        if p.environ().get("RANK") == str(rank):
            return p.pid
    raise AssertionError(f"no rank {rank} of {d}")


def signalled(target: str, d: Path, proc: subprocess.Popen) -> tuple[int, signal.Signals]:
    """(pid, signal) of each path a stop can take."""
    if target == "supervisor":
        return proc.pid, signal.SIGTERM  # `armlab stop`, a batch script's kill, a preemption's SIGTERM
    if target == "torchrun":
        (agent,) = [c for c in psutil.Process(proc.pid).children() if "torch.distributed.run" in c.cmdline()]
        return agent.pid, signal.SIGUSR1  # Slurm signals every task of the step, the agent included
    return rank_pid(d, 1), signal.SIGUSR1  # Slurm's --signal=USR1@N reaching a rank


@pytest.mark.parametrize("target", ["supervisor", "torchrun", "rank"])
def test_a_stop_checkpoints_its_step_and_exits_130(
    exp_file: Path, uninterrupted: Path, tmp_path: Path, target: str
) -> None:
    proc, d, go = paused_run(exp_file, f"stop-{target}", tmp_path)
    try:
        workers = worker_procs(d)
        pid, sig = signalled(target, d, proc)
        os.kill(pid, sig)
        if target == "supervisor":  # taken in once the supervisor has written the stop request
            wait_for(lambda: (d / runs.STOP_REQUEST).exists(), timeout=30, what="the stop request")
        go.touch()
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.stdout.read(), proc.stderr.read()
    assert f"run 'stop-{target}' stopped at step {STOP_AT} by {sig.name}; checkpoint step {STOP_AT} is saved" in err
    assert "Traceback" not in out + err
    state = runs.read_run_state(d)
    assert (state.state, state.step, state.resume_step, state.stop_reason) == ("stopped", STOP_AT, STOP_AT, sig.name)
    assert checkpoint.list_steps(d) == [STOP_AT]
    assert read_lease(data_dir(exp_file)) is None
    psutil.wait_procs(workers, timeout=15)
    assert not worker_procs(d)
    if target != "supervisor":
        return
    # the restart continues from the stop's checkpoint: bitwise the uninterrupted run (CPU)
    r = armlab("train", str(exp_file), "--arm", ARM, *QUICK, "--run-name", "stop-supervisor", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed from step {STOP_AT}" in r.stdout
    assert train_losses(d) == train_losses(uninterrupted)
    ours, theirs = (torch.load(x / "checkpoints/step_000010/model.pt") for x in (d, uninterrupted))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_a_restart_without_a_checkpoint_says_so_and_keeps_the_logs(exp_file: Path, tmp_path: Path) -> None:
    """kill -9 (no chance to checkpoint) before the first checkpoint: the next start says it begins
    from step 0, and the first try's train.log and metrics.jsonl are kept, not overwritten."""
    proc, d, _go = paused_run(exp_file, "restart", tmp_path, ONE)
    workers = worker_procs(d)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    psutil.wait_procs(workers, timeout=15)
    first_log = (d / runs.TRAIN_LOG).read_text()
    first_metrics = (d / runs.METRICS_JSONL).read_text()
    r = armlab("train", str(exp_file), "--arm", ARM, *ONE, "--run-name", "restart", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    said = (
        f"restart has no checkpoint (it reached step {STOP_AT} before stopping): restarting from step 0; "
        "its earlier logs are kept as train.1.log and metrics.1.jsonl"
    )
    assert said in " ".join(r.stderr.split())
    assert (d / "train.1.log").read_text() == first_log and (d / "metrics.1.jsonl").read_text() == first_metrics
    assert said in (d / runs.TRAIN_LOG).read_text() and sorted(train_losses(d)) == list(range(1, 11))


def test_a_second_ctrl_c_kills_at_once_and_says_where_it_resumes(exp_file: Path, tmp_path: Path) -> None:
    """Ctrl-C asks for a checkpoint; a second Ctrl-C does not wait for it: the run is stopped where
    its last checkpoint is (none here: from step 0), and says so."""
    proc, d, _go = paused_run(exp_file, "twice", tmp_path, ONE)  # never released: only a kill ends it
    try:
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: (d / runs.STOP_REQUEST).exists(), timeout=30, what="the stop request")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read()
    assert f"run 'twice' stopped at step {STOP_AT} by SIGINT (killed at once by a second SIGINT) before its first checkpoint: " \
           "a restart begins from step 0" in err  # fmt: skip
    state = runs.read_run_state(d)
    assert state.state == "stopped" and state.resume_step is None and checkpoint.list_steps(d) == []
