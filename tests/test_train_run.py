"""`armlab train` end to end: real subprocesses, real torchrun, real gloo ranks on CPU.

One tiny prepared experiment (depth 2, seq 64, 5 shard files of ONE row group each) is shared
by the module; every test trains its own run name in it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from armlab.budget import param_counts
from armlab.errors import ArmlabError
from armlab.spec import ModelSpec
from armlab.train import checkpoint, rundir
from armlab.train.checkpoint import load_model
from armlab.train.launch import _error_line, plan_run, train
from armlab.train.loop import Dist, train_loop
from armlab.workdir import check_writable, open_workdir, read_json, read_lease
from train_util import ARM, armlab, build_workdir, experiment, spawn, train_losses, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("train"))


def run_dir(exp_file: Path, run: str) -> Path:
    return open_workdir(experiment(exp_file), create=False).run_dir(ARM, run)


def data_dir(exp_file: Path) -> Path:
    return open_workdir(experiment(exp_file), create=False).data_dir(ARM)


def worker_procs(run: Path) -> list[psutil.Process]:
    plan = str(run / rundir.PLAN)
    out = []
    for p in psutil.process_iter(["cmdline"]):
        if plan in (p.info["cmdline"] or []):
            out.append(p)
    return out


def test_single_process_trains_and_loss_falls(exp_file: Path) -> None:
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "one")
    assert r.returncode == 0, r.stderr
    run = Path(r.stdout.strip().splitlines()[-1])
    assert run == run_dir(exp_file, "one")
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(21, 25)) / 4
    assert last < first - 0.3, (first, last)
    metrics = rundir.read_metrics(run)
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
    assert checkpoint.list_steps(run) == [8, 16, 24]
    model, cmeta = load_model(run)
    assert cmeta["step"] == 24 and not model.training
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 400)
    assert read_lease(data_dir(exp_file)) is None  # lease released
    # --resume on a finished run is a no-op that keeps it done (what `armlab run` does after a crash)
    assert train(experiment(exp_file), ARM, run_name="one", device="cpu", resume=True) == run
    assert read_json(run / "state.json")["state"] == "done" and checkpoint.list_steps(run) == [8, 16, 24]
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
    plan = plan_run(experiment(exp_file), ARM, run_name_="inproc", device="cpu", num_iterations=3)
    train_loop(plan, Dist(0, 1, torch.device("cpu")))
    assert checkpoint.list_steps(run_dir(exp_file, "inproc")) == [3]
    assert not [t for t in threading.enumerate() if t.name == "armlab-loader"]


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_master_port_in_use_is_refused_before_anything_starts(exp_file: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:  # another run's torchrun
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2",
                   "--run-name", "port", "--master-port", str(port))  # fmt: skip
    assert r.returncode == 2 and f"--master-port {port} is in use" in r.stderr and "Traceback" not in r.stderr
    assert not run_dir(exp_file, "port").exists()


def test_a_launcher_failure_names_its_cause() -> None:
    out = [
        b"step 00001/00016 | loss 5.9\n",
        b"[E] torch.distributed.DistNetworkError: port 1 taken\n",
        b"done\n",
    ]
    assert _error_line(out) == "[E] torch.distributed.DistNetworkError: port 1 taken"
    assert _error_line([b"step 1\n"]) is None


def test_too_many_ranks_for_the_layout_is_refused(exp_file: Path) -> None:
    with pytest.raises(ArmlabError, match=r"has 5 row groups, needs >= 6"):
        plan_run(
            experiment(exp_file), ARM, run_name_="six", device="cpu", nproc=6, total_batch_size=6 * 4 * 64
        )


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


def test_crashing_rank_brings_the_others_down_with_its_error(exp_file: Path) -> None:
    t0 = time.time()
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "3", "--run-name", "crash",
               env={"ARMLAB_TEST_FAIL_RANK": "1", "ARMLAB_TEST_FAIL_STEP": "2"}, timeout=120)  # fmt: skip
    assert time.time() - t0 < 100  # no collective timeout: the agent stops the others at once
    assert r.returncode == 1
    assert "rank 1 failed: RuntimeError: injected failure on rank 1 at step 2" in r.stderr
    d = run_dir(exp_file, "crash")
    state = read_json(d / "state.json")
    assert state["state"] == "failed" and "rank 1" in state["error"]
    assert read_lease(data_dir(exp_file)) is None
    assert not worker_procs(d)


def test_sigterm_stops_the_ranks_and_releases_the_lease(exp_file: Path) -> None:
    d = run_dir(exp_file, "term")
    proc = spawn("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2", "--run-name", "term",
                 env={"ARMLAB_TEST_STEP_DELAY": "0.3"})  # fmt: skip
    try:
        wait_for(lambda: max(train_losses(d), default=0) >= 2, timeout=60, what="step 2")
        lease = read_lease(data_dir(exp_file))
        assert lease is not None and lease.pid == proc.pid and lease.run == "term"
        with pytest.raises(ArmlabError, match="leased by live run 'term'"):  # a second run on this arm now
            plan_run(experiment(exp_file), ARM, run_name_="other", device="cpu")
        assert not run_dir(exp_file, "other").exists()  # refused before writing anything
        workers = worker_procs(d)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "stopped by SIGTERM" in proc.stderr.read()
    assert read_json(d / "state.json")["state"] == "stopped"
    assert read_lease(data_dir(exp_file)) is None
    psutil.wait_procs(workers, timeout=10)
    assert not worker_procs(d)


def test_detach_returns_at_once_and_finishes(exp_file: Path) -> None:
    t0 = time.time()
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "bg", "--detach",
               "--num-iterations", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = Path(r.stdout.strip().splitlines()[-1])
    assert time.time() - t0 < 15 and d == run_dir(exp_file, "bg")
    wait_for(
        lambda: read_json(d / "state.json")["state"] in ("done", "failed"),
        timeout=60,
        what="detached run",
        interval=0.2,
    )
    state = read_json(d / "state.json")
    assert state["state"] == "done" and state["pid"] != os.getpid()
    assert "step 00004/00004 | loss" in (d / "train.log").read_text()


def test_bad_inputs_are_one_line_errors(exp_file: Path, tmp_path: Path) -> None:
    exp = experiment(exp_file)
    with pytest.raises(ArmlabError, match=r"--total-batch-size 1000 is not divisible .* use "):
        plan_run(exp, ARM, run_name_="x", device="cpu", total_batch_size=1000)
    with pytest.raises(ArmlabError, match=r"--num-gpus 1 but 0 GPUs visible"):
        plan_run(exp, ARM, run_name_="x", num_gpus=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ArmlabError, match=rf"--master-port {port} is in use"):
            plan_run(exp, ARM, run_name_="x", device="cpu", nproc=2, master_port=port)
    with pytest.raises(ArmlabError, match="unknown override"):
        plan_run(exp, ARM, run_name_="x", device="cpu", dept=3)
    with pytest.raises(ArmlabError, match="no arm named 'nope'"):
        plan_run(exp, "nope", device="cpu")
    # a horizon far beyond the arm's data repeats it: refused unless repeats are allowed
    with pytest.raises(ArmlabError, match=r"would repeat about .* --allow-repeat"):
        plan_run(exp, ARM, run_name_="rep", device="cpu", num_iterations=100_000, allow_repeat=False)
    assert plan_run(exp, ARM, run_name_="rep", device="cpu", num_iterations=100_000)["world_size"] == 1
    # resume with another config (depth) than the checkpoint was written with
    plan_run(exp, ARM, run_name_="cfg", device="cpu", num_iterations=2)
    with pytest.raises(
        ArmlabError, match=r"checkpoint is from another config \(differs in fingerprint.*config.depth"
    ):
        plan_run(exp, ARM, run_name_="cfg", device="cpu", resume=True, depth=1, num_iterations=2)
    with pytest.raises(ArmlabError, match=r"differs in config.world_size\)"):
        plan_run(exp, ARM, run_name_="cfg", device="cpu", nproc=2, resume=True, num_iterations=2)

    # an arm that was never prepared, and a tokenizer that is missing: through the CLI, exit 2
    wd = open_workdir(exp, create=False)
    manifest = wd.data_dir(ARM) / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    try:
        r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "x")
        assert (
            r.returncode == 2
            and f"run `armlab prepare EXP --arm {ARM}`" in r.stderr
            and "Traceback" not in r.stderr
        )
    finally:
        manifest.write_bytes(saved)
    tok_manifest = wd.tokenizer_dir / "manifest.json"
    saved = tok_manifest.read_bytes()
    try:
        foreign = json.loads(saved)
        foreign["spec"]["experiment"] = "someone-else"
        tok_manifest.write_text(json.dumps(foreign))
        with pytest.raises(ArmlabError, match="tokenizer was trained for experiment 'someone-else'"):
            plan_run(exp, ARM, run_name_="x", device="cpu")
        tok_manifest.unlink()
        with pytest.raises(ArmlabError, match="run `armlab tokenizer EXP` first"):
            plan_run(exp, ARM, run_name_="x", device="cpu")
    finally:
        tok_manifest.write_bytes(saved)


def test_zero_ranks_are_refused_not_defaulted() -> None:
    from armlab.train.launch import resolve_devices

    assert resolve_devices(None, "cpu", None) == ("cpu", 1)
    with pytest.raises(ArmlabError, match="must be >= 1, got 0"):
        resolve_devices(None, "cpu", 0)  # used to mean "the default, 1" and train anyway
