"""`armlab train` end to end through the built-in engine: real subprocesses, real torchrun, real
gloo ranks on CPU (the plan's refusals: test_train_plan.py; signals, crashes, detach:
test_train_supervisor.py).

One tiny prepared experiment (depth 2, seq 64, 5 shard files of ONE row group each) is shared
by the module; every test trains its own run name in it.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from armlab import runs
from armlab.budget import param_counts
from armlab.errors import ArmlabError
from armlab.spec import ModelSpec
from armlab.train import checkpoint
from armlab.train.checkpoint import load_model
from armlab.train.loop import Dist, train_loop
from armlab.train.plan import TrainOptions, plan_run
from armlab.train.supervisor import train
from armlab.workdir import check_writable, read_json, read_lease
from train_util import (
    ARM,
    armlab,
    build_workdir,
    data_dir,
    experiment,
    run_dir,
    spawn,
    train_losses,
    unused_port,
    wait_for,
    worker_procs,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("train"))


def test_single_process_trains_and_loss_falls(exp_file: Path) -> None:
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "one")
    assert r.returncode == 0, r.stderr
    run = Path(r.stdout.strip().splitlines()[-1])
    assert run == run_dir(exp_file, "one")
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(21, 25)) / 4
    assert last < first - 0.3, (first, last)
    metrics = runs.read_metrics(run).records
    train_line = next(m for m in metrics if "train_loss" in m)
    assert {"step", "tokens", "time", "train_loss", "lr_mult", "dt", "tok_per_s", "mfu", "epoch"} <= set(
        train_line
    )
    assert train_line["mfu"] is None and train_line["tokens"] == 1536  # no MFU on CPU
    bpb = {m["step"]: m["val_bpb"] for m in metrics if "val_bpb" in m}
    assert sorted(bpb) == [0, 8, 16, 24] and bpb[24] < bpb[0]
    log = (run / "train.log").read_text()
    assert "step 00024/00024 | loss " in log and "| lrm 0.11 | dt " in log and "| mfu - | epoch " in log
    meta = read_json(run / "run.json")
    assert meta["config"]["grad_accum_steps"] == 6 and meta["config"]["world_size"] == 1
    assert meta["config"]["n_params"] == param_counts(ModelSpec(depth=2, max_seq_len=64), 400).total
    assert meta["fingerprint"] == experiment(exp_file).fingerprint()
    state = read_json(run / "state.json")
    assert state["state"] == "done" and state["step"] == 24 and state["pid"] > 0
    assert checkpoint.list_steps(run) == [8, 16, 22, 23, 24]  # save_every, and the last 3 evaluate scores
    model, cmeta = load_model(run)
    assert cmeta["step"] == 24 and not model.training
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 400)
    assert read_lease(data_dir(exp_file)) is None  # lease released
    # --resume on a finished run is a no-op that keeps it done (what `armlab run` does after a crash)
    assert train(experiment(exp_file), ARM, TrainOptions(run_name="one", device="cpu", resume=True)) == run
    assert read_json(run / "state.json")["state"] == "done" and checkpoint.list_steps(run) == [8, 16, 22, 23, 24]
    # the same run again without --resume is refused, naming the flags
    again = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "one")
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("nproc", [2, 3])
def test_ddp_on_one_row_group_files_never_hangs(exp_file: Path, nproc: int) -> None:
    """The playbook's hang: 5 files with one row group each, 2 or 3 ranks, all finish together."""
    run = f"ddp{nproc}"
    # 3 ranks: torchrun binds its own free port; 2 ranks: a --master-port the user picked
    port = () if nproc == 3 else ("--master-port", str(unused_port()))
    t0 = time.time()
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", str(nproc), "--run-name", run,
               "--num-iterations", "6", *port, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert time.time() - t0 < 120
    d = run_dir(exp_file, run)
    assert sorted(train_losses(d)) == list(range(1, 7))
    # The final checkpoint is a gather over all ranks at step 6: each rank reports its own loader,
    # and every rank read real data (none starved, which is what hung nanochat).
    ranks = checkpoint.load_checkpoint(d)["ranks"]
    assert [s["loader"]["rank"] for s in ranks] == list(range(nproc))
    assert all(s["loader"]["epoch"] >= 1 or s["loader"]["unit"] > 0 for s in ranks)
    assert read_json(d / "run.json")["config"]["grad_accum_steps"] == 6 // nproc


def test_the_loop_joins_its_loader_thread_before_returning(exp_file: Path) -> None:
    """A prefetch thread left running into interpreter exit aborted a rank ("terminate called
    without an active exception", SIGABRT) after its last step."""
    options = TrainOptions(run_name="inproc", device="cpu", overrides={"num_iterations": 3})
    plan = plan_run(experiment(exp_file), ARM, options)
    train_loop(plan, Dist(0, 1, torch.device("cpu")))
    assert checkpoint.list_steps(run_dir(exp_file, "inproc")) == [1, 2, 3]  # the last 3 (evaluate.last_k)
    assert not [t for t in threading.enumerate() if t.name == "armlab-loader"]


def test_kill_then_resume_matches_bitwise_and_lease_blocks_prepare(exp_file: Path) -> None:
    quick = ("--device", "cpu", "--nproc", "2", "--num-iterations", "16")  # checkpoints at 8 and 16
    full = armlab("train", str(exp_file), "--arm", ARM, *quick, "--run-name", "full")
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-2000:]

    killed = run_dir(exp_file, "killed")
    proc = spawn(
        "train",
        str(exp_file),
        "--arm",
        ARM,
        *quick,
        "--run-name",
        "killed",
        env={"ARMLAB_TEST_STEP_DELAY": "0.3"},
    )
    try:
        wait_for(lambda: checkpoint.list_steps(killed) == [8] and max(train_losses(killed), default=0) >= 10,
                 timeout=90, what="checkpoint 8 and step 10")  # fmt: skip
        # while training, the arm's data is leased: prepare's check refuses to write into it
        with pytest.raises(ArmlabError, match="leased by live run 'killed'"):
            check_writable(data_dir(exp_file), action="prepare 'rand'")
        workers = worker_procs(killed)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher dies; its ranks must not live on
        proc.wait(10)
        psutil.wait_procs(workers, timeout=15)
        assert not worker_procs(killed), "ranks outlived their launcher"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_json(killed / "state.json")["state"] == "running"  # what a kill -9 leaves behind
    with pytest.raises(ArmlabError, match="stale lease"):
        check_writable(data_dir(exp_file), action="prepare 'rand'")

    r = armlab("train", str(exp_file), "--arm", ARM, *quick, "--run-name", "killed", "--resume")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "resumed from step 8" in r.stdout
    a, b = train_losses(run_dir(exp_file, "full")), train_losses(killed)
    assert sorted(b) == list(range(1, 17))
    assert [a[s] for s in range(1, 17)] == [b[s] for s in range(1, 17)]  # bitwise, every step
    assert read_lease(data_dir(exp_file)) is None
    assert read_json(killed / "state.json")["state"] == "done"
