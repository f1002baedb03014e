"""Training engines: the one seam between armlab and the code that trains a model.

An engine is what varies between armlab's own trainer (`builtin`: torchrun + armlab.train.worker)
and a researcher's nanochat checkout (`nanochat`: torchrun + `scripts.base_train`). Everything
else is the same for every engine and lives outside it: the plan and its refusals
(armlab.train.plan), the supervisor that owns a run (armlab.train.supervisor: lease, state.json,
signals, train.log, rank errors, detach, exit codes), the run dir (armlab.runs), status, compare.
Nothing outside this package branches on the engine's name: it asks the engine.

Who calls what, for one run (`plan` is an armlab.train.plan.RunPlan):

    armlab.train.plan.plan_run         engine = get_engine(exp.train.engine)
                                       config = engine.configure(exp)          refuse bad settings
                                       budget = engine.budget(exp, vocab)      steps, batch, tokens
                                       engine.checkpoint_steps(run_dir)        --resume: from where
                                       engine.compile_choice(...)              torch.compile or not
                                       engine.preflight(plan)                  last refusals; then
                                                                               run.json + plan.json
    armlab.train.supervisor.supervise  cmd = engine.command(plan)              (argv, env, cwd)
                                       engine.on_output(plan, line)            every line, as tee'd
                                       engine.on_exit(plan, returncode)
    armlab.evaluate.run.evaluate_run   engine.checkpoint_steps(run_dir), engine.weights_files(run_dir, step),
                                       engine.evaluate(request) for each of the last k checkpoints
    armlab.ops.doctor.run_doctor       engine.doctor_checks(report, exp)
    export / notebooks                 engine.load_model(run_dir, device)

`get_engine` returns a fresh instance, and the supervisor makes one per run, so an engine may keep
per-run state on `self` between `command`, `on_output` and `on_exit` (nanochat's stdout parser).

While the ranks run, the engine keeps `state.json` current (state "running", `step`) and appends
`metrics.jsonl` records with armlab's field names (`step`, `tokens`, `time`, `train_loss`,
`val_bpb`, `tok_per_s`, `mfu`, ...): the built-in trainer's rank 0 writes both itself; an engine
whose processes know nothing of armlab does it from `on_output` with `armlab.runs.write_state` and
an append to `plan.run_dir / armlab.runs.METRICS_JSONL`.

Protocol stability: methods are only added, each with a default in `BaseEngine`; a change to a
signature is announced in a commit message starting `engine seam:`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from armlab.errors import ArmlabError

if TYPE_CHECKING:
    import torch

    from armlab.budget import Budget
    from armlab.evaluate.record import CheckpointEval
    from armlab.spec import Experiment
    from armlab.tokenizer import Tokenizer
    from armlab.train.compiling import CompileChoice
    from armlab.train.plan import RunPlan

# name -> "module:class". Adding an engine is one line here plus its module; the spec's
# `[train] engine` Literal lists the same names.
ENGINES = {
    "builtin": "armlab.train.engines.builtin:BuiltinEngine",
    "nanochat": "armlab.train.engines.nanochat:NanochatEngine",
}


@dataclass(frozen=True)
class EngineConfig:
    """What `configure` resolved, as a typed record. Engines subclass it with their own fields
    (nanochat: checkout, python, commit, diff hash, flags). `to_json()` goes into run.json
    ("engine") and plan.json; `comparable()` enters the run's fingerprint and compare's check that
    every run of a report was trained by the same engine (e.g. the same nanochat commit)."""

    engine: str

    def comparable(self) -> dict[str, Any]:
        """Fields every compared run must share ({}: the spec says everything)."""
        return {}

    def describe(self) -> str:
        """One line naming the engine build for people (`armlab status` prints it under the table)."""
        return self.engine

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


class Command(NamedTuple):
    """How the supervisor starts the ranks: one process (torchrun, or the rank itself when there is
    one), in its own session, its output (stdout + stderr) tee'd into train.log."""

    argv: list[str]
    env: dict[str, str]  # set on top of the supervisor's own environment
    cwd: Path | None = None  # None: the supervisor's working dir


@dataclass(frozen=True)
class EvalRequest:
    """What `armlab evaluate` asks of an engine for one finished run."""

    run_dir: Path
    exp: Experiment
    tokenizer: Tokenizer  # the experiment's (checked to be the run's)
    eval_dir: Path  # the shared eval set
    bundle: Any  # armlab.evaluate.bundle CORE bundle, or None: val bpb only
    max_per_task: int | None
    device: str
    max_tokens: int | None = None  # val bpb over a seeded sample of whole docs of this many tokens; None: all
    step: int | None = None  # the checkpoint to evaluate (None: the latest)
    packed: bool = True  # also nanochat's packed val bpb (the second, labelled number)
    bpb: bool = True  # val bpb at all (an earlier one of the last k, not averaged: CORE's noise only)


class CheckReport(Protocol):
    """What `doctor_checks` writes into (armlab.ops.doctor.DoctorReport)."""

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None: ...


class Engine(Protocol):
    """The training engine protocol. Every method may raise ArmlabError (one line, exit 2)."""

    # Whether the ranks, asked to stop (a signal, the run's stop-request file), finish their step,
    # save a checkpoint and exit 0 with state.json "stopped" (armlab.train.stop); else the
    # supervisor's signal ends them and the run resumes from its last checkpoint.
    stops_with_checkpoint: bool

    def configure(self, exp: Experiment) -> EngineConfig:
        """Resolve the engine's settings from the effective spec (overrides applied), with no side
        effects: builtin has nothing beyond the spec; nanochat finds the checkout, its python,
        commit, diff hash and the flags its `base_train --help` offers."""
        ...

    def load_config(self, data: Mapping[str, Any]) -> EngineConfig:
        """The inverse of `config.to_json()` (plan.json is read back by the supervisor)."""
        ...

    def budget(self, exp: Experiment, vocab_size: int) -> Budget:
        """Parameters, steps, batch and tokens of one run (what plan, doctor and plan_run use)."""
        ...

    def checkpoint_steps(self, run_dir: Path) -> list[int]:
        """Steps of the run's complete checkpoints, ascending (read only): the last is where a
        --resume continues and what evaluate evaluates."""
        ...

    def preflight(self, plan: RunPlan) -> None:
        """Engine checks that refuse before anything is written or started."""
        ...

    def compile_choice(
        self, exp: Experiment, device: str, budget: Budget, world_size: int, ranks_per_node: int
    ) -> CompileChoice:
        """Whether the run torch.compiles (recorded in run.json `config.compile`; a resume keeps it)."""
        ...

    def command(self, plan: RunPlan) -> Command:
        """The rank launcher (build it with `torchrun_argv` and `rank_env`)."""
        ...

    def on_output(self, plan: RunPlan, line: str) -> None:
        """One line the ranks printed (decoded, without its newline), after it reached train.log.
        An exception here is reported once in train.log and the handler is not called again; the
        run goes on."""
        ...

    def on_exit(self, plan: RunPlan, returncode: int) -> None:
        """The ranks' process exited (before the supervisor writes done / failed)."""
        ...

    def evaluate(self, request: EvalRequest) -> CheckpointEval:
        """One checkpoint (`request.step`) scored by armlab itself: whole-document val bpb (and the
        packed second number), CORE with per-item continuous scores (armlab.evaluate.run), plus
        what the engine itself measured there, labelled (`engine`). BaseEngine does it for any
        engine whose `load_model` gives a model called as nanochat's GPT is."""
        ...

    def load_model(
        self, run_dir: Path, device: str | torch.device = "cpu", step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """(model in eval mode, checkpoint meta) of the run's checkpoint at `step` (None: the latest)."""
        ...

    def weights_files(self, run_dir: Path, step: int) -> list[Path]:
        """The files holding the checkpoint's weights (what eval.json's checkpoint hash covers)."""
        ...

    def doctor_checks(self, report: CheckReport, exp: Experiment | None) -> None:
        """The engine's own `armlab doctor` checks (nanochat: the checkout, its python, TF32)."""
        ...


class BaseEngine:
    """Defaults for the optional hooks, so an engine writes only what it needs."""

    stops_with_checkpoint = False

    def preflight(self, plan: RunPlan) -> None:
        return None

    def compile_choice(
        self, exp: Experiment, device: str, budget: Budget, world_size: int, ranks_per_node: int
    ) -> CompileChoice:
        from armlab.train.compiling import CompileChoice

        return CompileChoice(exp.train.compile, "train.compile")

    def on_output(self, plan: RunPlan, line: str) -> None:
        return None

    def on_exit(self, plan: RunPlan, returncode: int) -> None:
        return None

    def doctor_checks(self, report: CheckReport, exp: Experiment | None) -> None:
        return None

    def evaluate(self, request: EvalRequest) -> CheckpointEval:
        from armlab.evaluate.model import evaluate_model

        model, _ = self.load_model(request.run_dir, request.device, request.step)  # type: ignore[attr-defined]
        return evaluate_model(model, request)


def get_engine(name: str) -> Engine:
    """A fresh instance of the engine `name` (`[train] engine`)."""
    try:
        target = ENGINES[name]
    except KeyError:
        raise ArmlabError(f"train.engine {name!r}: use one of {', '.join(ENGINES)}") from None
    module, _, cls = target.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ArmlabError(f"train.engine {name!r} is not part of this armlab ({module} is missing)") from None
    return getattr(mod, cls)()


# -- shared by every engine that starts torch ranks ---------------------------------------------------
def torchrun_argv(
    python: str,
    target: list[str],
    world_size: int,
    master_port: int | None,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> list[str]:
    """argv running `target` (["-m", "module", *args] or ["script.py", *args]) on `world_size` ranks
    of this node (`nnodes` x `world_size` in all).

    One rank on one node runs the target directly (no agent, no port). Several run under torchrun:
    on one node without a port torchrun binds port 0 itself (c10d rendezvous on 127.0.0.1), so the
    kernel hands out a free port atomically; probing for one here and passing it on would race
    other runs. A given port (checked free by the plan) is a static rendezvous. Several nodes meet
    at `rdzv_endpoint` (node 0's HOST:PORT) in a static rendezvous, so the node rank decides the
    ranks (node K holds ranks K*world_size ...) and node 0 holds rank 0, which writes the run's
    state. `--max-restarts=0`: a failed rank fails the run, and the agent stops the other ranks at once.
    """
    if world_size == 1 and nnodes == 1:
        return [python, *target]
    if nnodes > 1:
        assert rdzv_endpoint is not None
        host, _, port = rdzv_endpoint.rpartition(":")
        rendezvous = [f"--master-addr={host}", f"--master-port={port}"]
    elif master_port is None:
        rendezvous = ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    else:
        rendezvous = ["--master-addr=127.0.0.1", f"--master-port={master_port}"]
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--nproc-per-node={world_size}",
        *rendezvous, "--max-restarts=0", *target,
    ]  # fmt: skip


def runs_torchrun(argv: list[str]) -> bool:
    """Whether `argv` (from torchrun_argv) starts torchrun's agent, whose children are the ranks."""
    return "torch.distributed.run" in argv


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def rank_env(device: str, world_size: int) -> dict[str, str]:
    """Environment every engine's ranks get: unbuffered output (train.log and on_output see each
    line as it is printed) and, on CPU, the cores split evenly over the ranks (OMP threads = cores
    / ranks: more would oversubscribe, and a spin-waiting OpenMP pool runs several times slower;
    fewer leaves cores idle). A user's OMP_NUM_THREADS wins.

    torchrun (read as its flags' environment defaults, ignored by a torch without them): a stop
    signal that reaches the agent itself (Slurm signals every process of a job step) is forwarded
    to the ranks, SIGUSR1 included (Slurm's `--signal` before a time limit), and the ranks get
    STOP_GRACE_S to checkpoint before the agent kills them (torch's default: 30 s)."""
    from armlab.train.stop import GRACE_S

    env = {"PYTHONUNBUFFERED": "1"}
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // world_size))
    env["PET_SIGNALS_TO_HANDLE"] = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
    env["PET_SHUTDOWN_TIMEOUT"] = env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(GRACE_S)
    return env
