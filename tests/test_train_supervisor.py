"""armlab.train.supervisor: the process that owns a run, for every engine.

Real runs of the built-in engine (real torchrun, gloo ranks on CPU): a crashing rank -> exit 1
with its error line; --detach returns at once and the run finishes in its own session; `armlab
stop` of a detached run checkpoints first (every stop path: test_train_stop.py). The engine hooks
are observed through a subclass of the real built-in engine handed to `supervise`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from armlab import runs
from armlab.errors import ArmlabError
from armlab.train import checkpoint
from armlab.train.engines import Command
from armlab.train.engines.builtin import BuiltinEngine
from armlab.train.failure import error_line
from armlab.train.plan import RunPlan, TrainOptions, plan_run
from armlab.train.supervisor import supervise
from armlab.workdir import read_json, read_lease
from train_util import (
    ARM,
    armlab,
    build_workdir,
    data_dir,
    experiment,
    run_dir,
    train_losses,
    wait_for,
    worker_procs,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("supervisor"))


def quick_plan(exp_file: Path, run: str, steps: int = 2) -> RunPlan:
    options = TrainOptions(run_name=run, device="cpu", overrides={"num_iterations": steps})
    return plan_run(experiment(exp_file), ARM, options)


class Observed(BuiltinEngine):
    """The built-in engine, recording what the supervisor hands it (optionally failing on a line)."""

    def __init__(self, fail_on_line: int | None = None) -> None:
        self.lines: list[str] = []
        self.exit: int | None = None
        self.fail_on_line = fail_on_line

    def on_output(self, plan: RunPlan, line: str) -> None:
        self.lines.append(line)
        if len(self.lines) == self.fail_on_line:
            raise ValueError("parser bug")

    def on_exit(self, plan: RunPlan, returncode: int) -> None:
        self.exit = returncode


def test_the_engine_sees_every_line_that_reaches_train_log(exp_file: Path) -> None:
    plan = quick_plan(exp_file, "hooks")
    engine = Observed()
    assert supervise(plan, echo=False, engine=engine) == plan.run_dir
    log = (plan.run_dir / runs.TRAIN_LOG).read_text().splitlines()
    assert engine.lines == log and engine.exit == 0
    assert any(line.startswith("step 00002/00002 | loss") for line in engine.lines)
    assert runs.read_state(plan.run_dir)["state"] == "done"


def test_a_failing_output_handler_is_reported_once_and_the_run_goes_on(exp_file: Path) -> None:
    plan = quick_plan(exp_file, "parser-bug")
    engine = Observed(fail_on_line=1)
    supervise(plan, echo=False, engine=engine)
    log = (plan.run_dir / runs.TRAIN_LOG).read_text()
    assert len(engine.lines) == 1 and log.count("output handler failed (ValueError: parser bug)") == 1
    assert "step 00002/00002 | loss" in log and runs.read_state(plan.run_dir)["state"] == "done"
    assert read_lease(data_dir(exp_file)) is None


def test_a_command_that_cannot_start_is_one_line_and_releases_the_lease(exp_file: Path) -> None:
    class Missing(BuiltinEngine):
        def command(self, plan: RunPlan) -> Command:
            return Command(["/nonexistent/python", "-m", "x"], {}, None)

    plan = quick_plan(exp_file, "nocmd")
    with pytest.raises(
        ArmlabError, match=r"cannot start the builtin engine's command /nonexistent/python: No such"
    ):
        supervise(plan, echo=False, engine=Missing())
    assert runs.read_state(plan.run_dir)["state"] == "failed" and read_lease(data_dir(exp_file)) is None


def test_a_launcher_failure_names_its_cause() -> None:
    out = ["step 00001/00016 | loss 5.9", "[E] torch.distributed.DistNetworkError: port 1 taken", "done"]
    assert error_line(out) == "[E] torch.distributed.DistNetworkError: port 1 taken"
    assert error_line(["step 1"]) is None


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
    wait_for(lambda: read_lease(data_dir(exp_file)) is None, timeout=10, what="lease released")


def test_stop_ends_a_detached_run_cleanly(exp_file: Path) -> None:
    """`armlab stop` (armlab.runs.stop_run) asks the detached supervisor to stop (a stop request,
    then SIGTERM): its ranks save a checkpoint of the step they are at and exit, the lease is
    released, and state.json says stopped, by `armlab stop`, resuming from that step."""
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2", "--run-name", "bg-stop",
               "--detach", "--num-iterations", "200", env={"ARMLAB_TEST_STEP_DELAY": "0.3"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = run_dir(exp_file, "bg-stop")
    wait_for(lambda: max(train_losses(d), default=0) >= 1, timeout=60, what="step 1")
    pid = read_json(d / "state.json")["pid"]
    workers = worker_procs(d)
    assert runs.is_live(runs.read_state(d)) and len(workers) >= 2
    stop = armlab("stop", str(exp_file), "--arm", ARM, "--timeout", "40")
    assert stop.returncode == 0 and f"{ARM}\tbg-stop\tpid {pid}\tstopped (SIGTERM)" in stop.stdout
    state = runs.read_run_state(d)
    assert (state.state, state.stop_reason) == ("stopped", "armlab stop")
    assert state.resume_step == state.step and checkpoint.list_steps(d) == [state.step]  # checkpoint first
    assert read_lease(data_dir(exp_file)) is None
    psutil.wait_procs(workers, timeout=10)
    assert not worker_procs(d)
    assert armlab("stop", str(exp_file), "--arm", ARM).stdout.strip() == "no live runs"
