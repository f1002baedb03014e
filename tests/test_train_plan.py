"""armlab.train.plan: the typed RunPlan through plan.json, and every refusal before a rank starts.

Runs against one tiny prepared experiment (train_util) with the real tokenizer, loader layout
check and port probe; a refused command must leave the run dir exactly as it was.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from armlab import runs
from armlab.errors import ArmlabError
from armlab.train.engines import cpu_cores, get_engine, rank_env, torchrun_argv
from armlab.train.engines.builtin import BuiltinConfig
from armlab.train.plan import RunConfig, RunPlan, TrainOptions, plan_run, resolve_devices
from armlab.workdir import open_workdir, read_json
from train_util import ARM, armlab, build_workdir, experiment, run_dir


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("plan"))


def opts(run: str = "x", **kw) -> TrainOptions:
    """TrainOptions for a CPU run; spec keys (depth, num_iterations, ...) go to overrides."""
    fields = set(TrainOptions.__dataclass_fields__) - {"overrides"}
    return TrainOptions(
        run_name=run, device=kw.pop("device", "cpu"), **{k: kw.pop(k) for k in list(kw) if k in fields},
        overrides=kw,
    )  # fmt: skip


def snapshot(d: Path) -> dict[str, bytes]:
    return (
        {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
        if d.exists()
        else {}
    )


def test_the_plan_round_trips_through_plan_json(exp_file: Path) -> None:
    plan = plan_run(experiment(exp_file), ARM, opts("rt", nproc=2, num_iterations=4, depth=1))
    assert plan.plan_file == run_dir(exp_file, "rt") / "plan.json" and plan.plan_file.is_file()
    back = RunPlan.read(plan.plan_file)
    assert back == plan  # every field, typed: Paths, the experiment, RunConfig, the engine record
    assert isinstance(back.config, RunConfig) and isinstance(back.engine, BuiltinConfig)
    assert back.experiment.model.depth == 1 and back.experiment.train.num_iterations == 4
    assert back.config.world_size == 2 and back.config.grad_accum_steps == 3 and back.resume_step is None
    info = read_json(plan.run_dir / runs.RUN_JSON)
    assert info["engine"] == {"engine": "builtin"} and info["engine_comparable"] == {}
    assert info["fingerprint"] == plan.fingerprint == back.experiment.fingerprint()
    assert info["config"] == json.loads(json.dumps(back.to_json()["config"]))
    assert info["overrides"] == {"num_iterations": 4, "depth": 1}
    assert info["seed"] == info["data_seed"] == plan.order_seed == 0  # no data_seeds: the seed is both


def test_the_engine_is_resolved_by_name() -> None:
    assert get_engine("builtin").configure(None) == BuiltinConfig()  # the spec is its whole recipe
    with pytest.raises(ArmlabError, match=r"train.engine 'nanogpt': use one of builtin, nanochat"):
        get_engine("nanogpt")


def test_a_master_port_in_use_is_refused_before_anything_starts(exp_file: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:  # another run's torchrun
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2",
                   "--run-name", "port", "--master-port", str(port))  # fmt: skip
    assert r.returncode == 2 and f"--master-port {port} is in use" in r.stderr and "Traceback" not in r.stderr
    assert not run_dir(exp_file, "port").exists()


def test_too_many_ranks_for_the_layout_is_refused(exp_file: Path) -> None:
    with pytest.raises(ArmlabError, match=r"has 5 row groups, needs >= 6"):
        plan_run(experiment(exp_file), ARM, opts("six", nproc=6, total_batch_size=6 * 4 * 64))


def test_bad_inputs_are_one_line_errors(exp_file: Path) -> None:
    exp = experiment(exp_file)
    with pytest.raises(ArmlabError, match=r"--total-batch-size 1000 is not divisible .* use "):
        plan_run(exp, ARM, opts(total_batch_size=1000))
    with pytest.raises(ArmlabError, match=r"--num-gpus 1 but 0 GPUs visible"):
        plan_run(exp, ARM, opts(device=None, num_gpus=1))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ArmlabError, match=rf"--master-port {port} is in use"):
            plan_run(exp, ARM, opts(nproc=2, master_port=port))
    with pytest.raises(ArmlabError, match="unknown override"):
        plan_run(exp, ARM, opts(dept=3))
    with pytest.raises(ArmlabError, match="no arm named 'nope'"):
        plan_run(exp, "nope", opts())
    # a horizon far beyond the arm's data repeats it: refused unless repeats are allowed
    with pytest.raises(ArmlabError, match=r"would repeat about .* --allow-repeat"):
        plan_run(exp, ARM, opts("rep", num_iterations=100_000, allow_repeat=False))
    assert not run_dir(exp_file, "rep").exists()
    assert plan_run(exp, ARM, opts("rep", num_iterations=100_000)).world_size == 1
    # resume with another config (depth) than the checkpoint was written with
    plan_run(exp, ARM, opts("cfg", num_iterations=2))
    with pytest.raises(
        ArmlabError, match=r"checkpoint is from another config \(differs in fingerprint.*config.depth"
    ):
        plan_run(exp, ARM, opts("cfg", resume=True, depth=1, num_iterations=2))
    with pytest.raises(ArmlabError, match=r"differs in config.world_size\)"):
        plan_run(exp, ARM, opts("cfg", nproc=2, resume=True, num_iterations=2))
    with pytest.raises(ArmlabError, match=r"already holds run 'cfg'; pass --resume"):
        plan_run(exp, ARM, opts("cfg", num_iterations=2))

    # an arm that was never prepared, and a tokenizer that is missing: through the CLI, exit 2
    wd = open_workdir(exp, create=False)
    manifest = wd.data_dir(ARM) / "manifest.json"
    saved = manifest.read_bytes()
    manifest.unlink()
    try:
        r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--run-name", "x")
        assert r.returncode == 2 and f"run `armlab prepare {exp_file} --arm {ARM}`" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        manifest.write_bytes(saved)
    tok_manifest = wd.tokenizer_dir / "manifest.json"
    saved = tok_manifest.read_bytes()
    try:
        foreign = json.loads(saved)
        foreign["spec"]["experiment"] = "someone-else"
        tok_manifest.write_text(json.dumps(foreign))
        with pytest.raises(ArmlabError, match="tokenizer was trained for experiment 'someone-else'"):
            plan_run(exp, ARM, opts())
        tok_manifest.unlink()
        with pytest.raises(ArmlabError, match="run `armlab tokenizer EXP` first"):
            plan_run(exp, ARM, opts())
    finally:
        tok_manifest.write_bytes(saved)
    assert not run_dir(exp_file, "x").exists()


def test_a_refused_force_leaves_the_old_run_in_place(exp_file: Path) -> None:
    """--force deletes an existing run only once every check has passed."""
    exp = experiment(exp_file)
    plan_run(exp, ARM, opts("keep", num_iterations=2))
    before = snapshot(run_dir(exp_file, "keep"))
    with pytest.raises(ArmlabError, match=r"would repeat"):
        plan_run(exp, ARM, opts("keep", force=True, num_iterations=100_000, allow_repeat=False))
    with pytest.raises(ArmlabError, match=r"--total-batch-size 1000"):
        plan_run(exp, ARM, opts("keep", force=True, total_batch_size=1000))
    assert snapshot(run_dir(exp_file, "keep")) == before
    plan_run(exp, ARM, opts("keep", force=True, num_iterations=3))  # passes: starts over
    assert read_json(run_dir(exp_file, "keep") / runs.RUN_JSON)["overrides"] == {"num_iterations": 3}


def test_a_live_run_is_neither_clobbered_nor_resumed_twice(exp_file: Path) -> None:
    exp = experiment(exp_file)
    plan = plan_run(exp, ARM, opts("live", num_iterations=2))
    runs.write_state(plan.run_dir, state="running", pid=os.getpid())  # this process "runs" it
    for again in (opts("live", force=True, num_iterations=2), opts("live", resume=True, num_iterations=2)):
        with pytest.raises(ArmlabError, match=rf"run 'live' is live \(pid {os.getpid()}\)"):
            plan_run(exp, ARM, again)


def test_zero_ranks_are_refused_not_defaulted() -> None:
    assert resolve_devices(None, "cpu", None) == ("cpu", 1)
    with pytest.raises(ArmlabError, match="must be >= 1, got 0"):
        resolve_devices(None, "cpu", 0)  # used to mean "the default, 1" and train anyway


def test_torchrun_rendezvous_is_port_zero_or_the_checked_port() -> None:
    target = ["-m", "armlab.train.worker", "plan.json"]
    assert torchrun_argv("py", target, 1, None) == ["py", *target]  # one rank: no agent, no port
    free = torchrun_argv("py", target, 3, None)
    assert "--rdzv-endpoint=127.0.0.1:0" in free and "--nproc-per-node=3" in free and free[-3:] == target
    fixed = torchrun_argv("py", target, 2, 29511)
    assert "--master-port=29511" in fixed and not any(a.startswith("--rdzv") for a in fixed)


def test_cpu_ranks_split_every_core_they_are_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert cpu_cores() == cores
    assert rank_env("cpu", 1)["OMP_NUM_THREADS"] == str(cores)  # not cores - 1
    assert rank_env("cpu", cores)["OMP_NUM_THREADS"] == "1"
    assert rank_env("cpu", 4 * cores)["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in rank_env("cuda", 1) and rank_env("cuda", 1)["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's setting wins
    assert "OMP_NUM_THREADS" not in rank_env("cpu", 1)
    # the affinity mask, not the machine: a process pinned to one core gets one thread
    monkeypatch.delenv("OMP_NUM_THREADS")
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    try:
        assert rank_env("cpu", 1)["OMP_NUM_THREADS"] == "1"
    finally:
        os.sched_setaffinity(0, old)


def test_a_schedule_that_does_not_fit_the_horizon_is_said_at_train_start(exp_file: Path, capsys) -> None:
    """A warmup of 15 steps (the file sets 2) and a 65% warmdown of 20 steps overlap: the run trains
    as asked, and its start says so, naming the key the file sets as one to lower."""
    plan_run(experiment(exp_file), ARM, opts("misfit", num_iterations=20, warmup_steps=15))
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "train: warning: the learning-rate schedule does not fit 20 steps: warmup 15 + warmdown 13" in err, err
    assert "lower train.warmup_steps (15) to <= 7" in err and "set train.warmup_steps" not in err
    plan_run(experiment(exp_file), ARM, opts("fits", num_iterations=20))
    assert "learning-rate schedule" not in capsys.readouterr().err
