"""armlab.train.compiling: CPU runs compile when the planned steps repay the compile, say which,
and a resumed run keeps the choice it started with (a compiled and an eager step differ in the
last bits; a resume continues its run bitwise)."""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.train import compiling
from armlab.train.plan import TrainOptions, plan_run
from armlab.workdir import read_json
from train_util import ARM, armlab, build_workdir, experiment


def test_the_choice_weighs_the_steps_against_the_compile() -> None:
    gflop = 1e9
    # 100 GFLOP a step at 10 GFLOP/s probe: ~29 s eager; 10 steps save ~95 s > ~65 s of compile
    long = compiling.choose(True, "cpu", 10, 100 * gflop, depth=4, probe_flops=10 * gflop)
    short = compiling.choose(True, "cpu", 2, 100 * gflop, depth=4, probe_flops=10 * gflop)
    assert long.compile and "compiling (~65 s) saves ~" in long.reason
    assert not short.compile and "less than the ~65 s a compile takes" in short.reason
    assert compiling.choose(True, "cuda", 1, 1.0, depth=4, probe_flops=None).compile  # always on CUDA
    off = compiling.choose(False, "cpu", 10**9, 1e15, depth=4, probe_flops=1.0)
    assert not off.compile and off.reason == "train.compile = false"
    assert compiling.cpu_matmul_flops(64, 64, threads=1, seconds=0.05) > 0


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("compiling"))


def test_a_cpu_run_says_its_choice_and_a_resume_keeps_it(exp_file: Path) -> None:
    """The choice and why go to the rank's banner (train.log), through the plan."""
    exp = experiment(exp_file)
    short = plan_run(exp, ARM, TrainOptions(run_name="short", device="cpu"))  # the test's 24 tiny steps
    assert short.config.compile is False and short.compile_reason.startswith("24 steps x ~")
    assert "less than the ~55 s a compile takes" in short.compile_reason
    many = TrainOptions(run_name="long", device="cpu", overrides={"num_iterations": 10**8})
    plan = plan_run(exp, ARM, many)
    assert plan.config.compile is True and read_json(plan.run_dir / "run.json")["config"]["compile"] is True
    assert plan.compile_reason.startswith("100,000,000 steps x ~") and "compiling (~55 s) saves ~" in plan.compile_reason
    resumed = plan_run(exp, ARM, TrainOptions(run_name="long", device="cpu", resume=True,
                                              overrides={"num_iterations": 10**8}))  # fmt: skip
    assert resumed.config.compile is True and resumed.compile_reason is None  # kept, not chosen again
    off = plan_run(exp, ARM, TrainOptions(run_name="off", device="cpu", overrides={"num_iterations": 10**8,
                                                                                   "compile": False}))  # fmt: skip
    assert off.config.compile is False


def test_the_log_says_why_a_run_is_eager(exp_file: Path) -> None:
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "said", "--num-iterations", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    banner = next(ln for ln in r.stdout.splitlines() if ln.startswith("train said:"))
    assert ", eager (2 steps x ~" in banner and "a compile takes)" in banner
