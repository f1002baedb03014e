"""The plan of one training run, and every refusal that can be made before anything starts.

`plan_run` checks, in order, and refuses (ArmlabError: one line, exit 2) with the workdir left
exactly as it was: unknown arm or override, the engine's settings (`Engine.configure`), an
unprepared arm or eval set, a missing or foreign tokenizer, more GPUs than visible, a total batch
the ranks cannot split, a layout that cannot feed the ranks (`check_feeds`), a taken master port,
a run dir that is live / already holds the run / holds a checkpoint from another config, the
engine's own preflight, and data that would repeat (DESIGN.md invariant 7). Only then does it
write: `run.json` (what the run is, once) and `plan.json`, the typed `RunPlan` that the supervisor
and the ranks read back.

The data lease is not checked here: training leases are shared read leases (armlab.workdir), taken
by the supervisor for the run's lifetime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from armlab import __version__, runs
from armlab.budget import batch_phrase, grad_accum_steps, model_dim
from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.spec import Experiment, fingerprint, parse_experiment, with_overrides
from armlab.train.engines import Engine, EngineConfig, get_engine
from armlab.train.recipe import schedule_misfit
from armlab.workdir import atomic_write_json, open_workdir, read_json

# run.json config keys a resumed run must share with the run that wrote the checkpoint
RESUME_KEYS = ("depth", "n_params", "total_batch_size", "device_batch_size", "num_iterations", "world_size")


@dataclass(frozen=True)
class TrainOptions:
    """How to train one arm: `armlab train`'s flags (None = the default)."""

    seed: int | None = None  # default: the first of train.seeds
    run_name: str | None = None  # default: <arm>-s<seed>
    num_gpus: int | None = None  # N CUDA ranks
    device: str | None = None  # "cuda" | "cpu" (default: cuda if available)
    nproc: int | None = None  # ranks with device cpu
    master_port: int | None = None  # default: torchrun binds a free one
    # one node of a multi-node run: --nnodes N --node-rank K --rdzv-endpoint HOST:PORT (node 0's
    # address; torchrun's static rendezvous). node_rank None: $SLURM_NODEID when nnodes > 1.
    nnodes: int = 1
    node_rank: int | None = None
    rdzv_endpoint: str | None = None
    resume: bool = False
    force: bool = False  # start an existing run over / take over a stale lease
    detach: bool = False
    # spec keys: a [model] or [train] field name (depth, num_iterations, engine, ...) or
    # "section.field" for any other section (e.g. "nanochat.path"); None values are not given
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunConfig:
    """The resolved numbers of a run (run.json "config", checkpoint meta, the ranks)."""

    depth: int
    model_dim: int
    max_seq_len: int
    vocab_size: int
    n_params: int
    scaling_params: int
    flops_per_token: int
    total_batch_size: int
    device_batch_size: int
    grad_accum_steps: int
    num_iterations: int
    tokens: int
    world_size: int
    device: str
    dtype: str
    compile: bool
    nnodes: int = 1  # world_size ranks on this many nodes


@dataclass(frozen=True)
class RunPlan:
    """Everything the supervisor and the ranks need, written to `<run dir>/plan.json`."""

    experiment: Experiment  # the effective spec (overrides applied)
    arm: str
    seed: int
    run: str
    run_dir: Path
    data_dir: Path
    eval_dir: Path
    tokenizer_dir: Path
    device: str  # "cuda" | "cpu"
    world_size: int
    master_port: int | None  # None: torchrun binds a free port
    resume_step: int | None  # the checkpoint to resume from; None: start fresh
    fingerprint: str  # run.json's: the spec's comparability + the engine's comparable fields
    config: RunConfig
    engine: EngineConfig
    force: bool
    visible_devices: str | None = (
        None  # CUDA_VISIBLE_DEVICES the ranks see (a lane's GPU set); None: all / CPU
    )
    # A multi-node run: this plan is node `node_rank` of `nnodes`, each running world_size / nnodes
    # ranks; node 0 (HOST of rdzv_endpoint) owns the run dir's state.json, metrics and checkpoints,
    # the others are followers with their own plan and log file (plan.node<K>.json, train.node<K>.log).
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0's rendezvous (static); None: one node
    compile_reason: str | None = None  # why a CPU run compiles or not (armlab.train.compiling), for the log
    data_seed: int | None = None  # the data-order seed (train.data_seeds); None: `seed`

    @property
    def follower(self) -> bool:
        """A node other than node 0 of a multi-node run: it writes no state.json, metrics or checkpoints."""
        return self.node_rank > 0

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def order_seed(self) -> int:
        """The seed of the run's data order (the loader's; nanochat's file order)."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def plan_file(self) -> Path:
        return self.run_dir / (f"plan.node{self.node_rank}.json" if self.follower else runs.PLAN_JSON)

    @property
    def log_file(self) -> Path:
        """What the supervisor tees the ranks' output into."""
        return self.run_dir / (f"train.node{self.node_rank}.log" if self.follower else runs.TRAIN_LOG)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(
            experiment=self.experiment.model_dump(mode="json"),
            config=dataclasses.asdict(self.config),
            engine=self.engine.to_json(),
        )
        return json.loads(json.dumps(out, default=str))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = runs.PLAN_JSON) -> RunPlan:
        d = dict(data)
        d.update({k: Path(d[k]) for k in ("run_dir", "data_dir", "eval_dir", "tokenizer_dir")})
        d.update(
            experiment=parse_experiment(d["experiment"], source),
            config=RunConfig(**d["config"]),
            engine=get_engine(d["engine"]["engine"]).load_config(d["engine"]),
        )
        return cls(**d)

    def write(self) -> Path:
        atomic_write_json(self.plan_file, self.to_json())
        return self.plan_file

    @classmethod
    def read(cls, path: str | Path) -> RunPlan:
        return cls.from_json(read_json(path), str(path))


def resolve_devices(num_gpus: int | None, device: str | None, nproc: int | None) -> tuple[str, int]:
    """(device kind, world size): --num-gpus N means N CUDA ranks; --device cpu --nproc N, N CPU ranks."""
    import torch

    if num_gpus is not None and device == "cpu":
        raise ArmlabError("--num-gpus is for CUDA; for CPU ranks use --device cpu --nproc N")
    if num_gpus is not None and nproc is not None and num_gpus != nproc:
        raise ArmlabError(f"--num-gpus {num_gpus} and --nproc {nproc} disagree; give one of them")
    if device is None:
        device = "cuda" if (num_gpus is not None or torch.cuda.is_available()) else "cpu"
    if device not in ("cpu", "cuda"):
        raise ArmlabError(f"--device {device!r}: use cpu or cuda")
    # `is not None`, not `or`: --nproc 0 is a mistake to refuse, not a request for the default
    world = num_gpus if num_gpus is not None else nproc if nproc is not None else 1
    if world < 1:
        raise ArmlabError(f"--num-gpus/--nproc must be >= 1, got {world}")
    if device == "cuda":
        visible = torch.cuda.device_count()
        if world > visible:
            where = os.environ.get("CUDA_VISIBLE_DEVICES")
            extra = f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
            raise ArmlabError(
                f"--num-gpus {world} but {visible} GPU{'s' if visible != 1 else ''} visible{extra}; "
                + (f"use --num-gpus {visible}" if visible else "use --device cpu")
            )
    return device, world


def resolve_nodes(
    nnodes: int, node_rank: int | None, endpoint: str | None, master_port: int | None
) -> tuple[int, str | None]:
    """(node rank, rendezvous endpoint) of one node of a run on `nnodes` nodes; refuses what torchrun
    would fail on later. On Slurm the node rank defaults to $SLURM_NODEID."""
    if nnodes < 1:
        raise ArmlabError(f"--nnodes {nnodes}: must be >= 1")
    if nnodes == 1:
        if node_rank not in (None, 0) or endpoint is not None:
            raise ArmlabError("--node-rank and --rdzv-endpoint are for a multi-node run: add --nnodes N")
        return 0, None
    if master_port is not None:
        raise ArmlabError(
            "--master-port is for one node; a multi-node run meets at --rdzv-endpoint HOST:PORT"
        )
    if endpoint is None:
        raise ArmlabError(
            f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free port, the same on every node)"
        )
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ArmlabError(
            f"--rdzv-endpoint {endpoint!r}: use HOST:PORT (node 0's address, a port in 1..65535)"
        )
    if node_rank is None:
        slurm = os.environ.get("SLURM_NODEID")
        if slurm is None or not slurm.isdigit():
            raise ArmlabError(
                f"--nnodes {nnodes} needs --node-rank K (0 on the node at {host}; 1..{nnodes - 1} on the others)"
            )
        node_rank = int(slurm)
    if not 0 <= node_rank < nnodes:
        raise ArmlabError(f"--node-rank {node_rank}: must be in 0..{nnodes - 1} for --nnodes {nnodes}")
    return node_rank, endpoint


def check_port(port: int, flag: str = "--master-port") -> int:
    """Refuse a rendezvous port something already listens on (two runs on one port hang)."""
    if not 0 < port < 65536:
        raise ArmlabError(f"{flag} {port}: must be in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            fix = (
                "omit --master-port to use a free one"
                if flag == "--master-port"
                else "pick a free port for every node"
            )
            raise ArmlabError(f"{flag} {port} is in use on this host (another run?); {fix}") from None
    return port


def run_fingerprint(exp: Experiment, engine: EngineConfig) -> str:
    """The run's fingerprint: the spec's, plus what the engine resolved (an engine that resolves
    nothing beyond the spec, like builtin, fingerprints as the spec)."""
    extra = engine.comparable()
    return fingerprint({**exp.comparability(), "engine_run": extra}) if extra else exp.fingerprint()


def _complete_manifest(directory: Path, fix: str, what: str) -> bytes:
    try:
        raw = (directory / "manifest.json").read_bytes()
        complete = read_json(directory / "manifest.json").get("complete")
    except FileNotFoundError:
        raw, complete = b"", False
    if not complete:
        raise ArmlabError(f"{what} is not prepared (no complete manifest.json in {directory}); run `{fix}`")
    return raw


def plan_run(exp: Experiment, arm: str, options: TrainOptions = TrainOptions()) -> RunPlan:
    """Every check that can fail on bad input, then run.json and plan.json (no rank started)."""
    from armlab.tokenizer import load_experiment_tokenizer
    from armlab.train.units import check_feeds

    o = options
    exp.arm(arm)  # unknown arm: error naming the arms
    eff = with_overrides(exp, o.overrides)
    engine = get_engine(eff.train.engine)
    engine_config = engine.configure(eff)
    seed = eff.train.seeds[0] if o.seed is None else o.seed
    run = o.run_name or eff.run_name(arm, seed)
    wd = open_workdir(exp, create=False)
    data_dir, run_dir = wd.data_dir(arm), wd.run_dir(arm, run)
    data_manifest = _complete_manifest(data_dir, f"armlab prepare EXP --arm {arm}", f"arm {arm!r}")
    _complete_manifest(wd.eval_dir, "armlab prepare EXP", "the shared eval set")
    tok = load_experiment_tokenizer(exp)
    node_rank, endpoint = resolve_nodes(o.nnodes, o.node_rank, o.rdzv_endpoint, o.master_port)
    kind, per_node = resolve_devices(o.num_gpus, o.device, o.nproc)
    world = per_node * o.nnodes
    budget = engine.budget(eff, tok.vocab_size)
    flag = o.overrides.get("total_batch_size") is not None  # a message names what the user typed
    accum = grad_accum_steps(
        budget.total_batch_size, eff.train.device_batch_size, eff.model.max_seq_len, world,
        batch_phrase(eff.train, budget.total_batch_size, flag),
    )  # fmt: skip
    check_feeds(data_dir, world)
    port = check_port(o.master_port) if o.master_port is not None else None
    compile_, compile_reason = _compile_choice(
        engine, eff, kind, budget, world, per_node, wd.run_dir(arm, run), o.resume
    )
    if endpoint is not None and node_rank == 0:  # node 0's torchrun serves the rendezvous there
        check_port(int(endpoint.rpartition(":")[2]), "--rdzv-endpoint")

    config = RunConfig(
        depth=eff.model.depth,
        model_dim=model_dim(eff.model),
        max_seq_len=eff.model.max_seq_len,
        vocab_size=tok.vocab_size,
        n_params=budget.params.total,
        scaling_params=budget.params.scaling,
        flops_per_token=budget.flops_per_token,
        total_batch_size=budget.total_batch_size,
        device_batch_size=eff.train.device_batch_size,
        grad_accum_steps=accum,
        num_iterations=budget.num_iterations,
        tokens=budget.tokens,
        world_size=world,
        device=kind,
        dtype=_compute_dtype(kind),
        compile=compile_,
        nnodes=o.nnodes,
    )
    run_json = {
        "experiment": exp.name,
        "arm": arm,
        "seed": seed,
        "data_seed": eff.train.data_seed(seed),
        "run": run,
        "fingerprint": run_fingerprint(eff, engine_config),
        "comparability": eff.comparability(),
        "engine": engine_config.to_json(),
        "engine_comparable": engine_config.comparable(),
        "tokenizer_fingerprint": tok.fingerprint,
        "data_manifest_sha256": hashlib.sha256(data_manifest).hexdigest(),
        "config": dataclasses.asdict(config),
        "overrides": {k: v for k, v in o.overrides.items() if v is not None},
        "created": time.time(),
        "host": socket.gethostname(),
        "armlab_version": __version__,
    }
    follower = node_rank > 0  # node 0's plan decides what the run is; a follower only joins it
    if follower:
        resume_step, clobber, restart = None, False, None
    else:
        resume_step, clobber, restart = _check_run_dir(run_dir, run_json, o.resume, o.force, engine)
    plan = RunPlan(
        experiment=eff, arm=arm, seed=seed, run=run, run_dir=run_dir, data_dir=data_dir,
        eval_dir=wd.eval_dir, tokenizer_dir=wd.tokenizer_dir, device=kind, world_size=world,
        master_port=port, resume_step=resume_step, fingerprint=run_json["fingerprint"], config=config,
        engine=engine_config, force=o.force,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES") if kind == "cuda" else None,
        nnodes=o.nnodes, node_rank=node_rank, rdzv_endpoint=endpoint, compile_reason=compile_reason,
        data_seed=eff.train.data_seed(seed),
    )  # fmt: skip
    engine.preflight(plan)
    _check_repeats(data_manifest, budget.tokens, arm, eff.train.allow_repeat)

    # every check passed: only now is anything written (or a clobbered run deleted)
    if misfit := schedule_misfit(eff.train, budget.num_iterations, defaults=eff.train.engine == "builtin"):
        console.print(f"[yellow]train: warning: {misfit}[/]")  # trains as asked; `armlab plan` says it too
    if clobber:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if follower:
        pass  # node 0 writes run.json and keeps the run's metrics
    elif restart is not None:
        _restart_from_zero(run_dir, restart)
    elif o.resume and (run_dir / runs.RUN_JSON).is_file():
        runs.truncate_metrics(run_dir, resume_step or 0)  # the file reads as one uninterrupted run
    else:
        atomic_write_json(run_dir / runs.RUN_JSON, run_json)
    plan.write()
    return plan


def _compile_choice(
    engine: Engine,
    exp: Experiment,
    device: str,
    budget: Any,
    world: int,
    per_node: int,
    run_dir: Path,
    resume: bool,
) -> tuple[bool, str | None]:
    """(the engine's choice (armlab.train.compiling), why, on CPU); a resumed run keeps its own."""
    if resume:
        with contextlib.suppress(FileNotFoundError, ArmlabError, KeyError, TypeError):
            return bool(read_json(run_dir / runs.RUN_JSON)["config"]["compile"]), None
    choice = engine.compile_choice(exp, device, budget, world, per_node)
    if device != "cpu" or not exp.train.compile:
        return choice.compile, None
    return choice.compile, choice.reason


def _restart_from_zero(run_dir: Path, reached: int) -> None:
    """A run resumed without a checkpoint starts over, and says so: its earlier logs are kept beside
    the new ones (train.<n>.log, metrics.<n>.jsonl), never overwritten."""
    n = 1
    while (run_dir / f"train.{n}.log").exists() or (run_dir / f"metrics.{n}.jsonl").exists():
        n += 1
    kept = []
    for name, new in ((runs.TRAIN_LOG, f"train.{n}.log"), (runs.METRICS_JSONL, f"metrics.{n}.jsonl")):
        if (run_dir / name).exists():
            os.replace(run_dir / name, run_dir / new)
            kept.append(new)
    where = f"; its earlier logs are kept as {' and '.join(kept)}" if kept else ""
    line = (
        f"train: {run_dir.name} has no checkpoint (it reached step {reached} before stopping): "
        f"restarting from step 0{where}"
    )
    console.print(f"[yellow]{line}[/]")
    with open(run_dir / runs.TRAIN_LOG, "a", encoding="utf-8") as log:
        log.write(line + "\n")


def _check_run_dir(
    run_dir: Path, new: dict[str, Any], resume: bool, force: bool, engine: Engine
) -> tuple[int | None, bool, int | None]:
    """(checkpoint step to resume from or None, whether the existing run is to be deleted first,
    the step a run resumed without a checkpoint had reached: it restarts from 0 (else None));
    refuses live, mismatched or clobbering runs. Writes nothing."""
    exists = (run_dir / runs.RUN_JSON).is_file()
    state = runs.read_state(run_dir) if exists else {}
    if runs.is_live(state):
        raise ArmlabError(
            f"{run_dir}: run {new['run']!r} is live (pid {state['pid']}); watch it with `armlab status EXP`, "
            "stop it with `armlab stop EXP`, or start another with --run-name NAME"
        )
    if exists and not resume:
        if not force:
            raise ArmlabError(
                f"{run_dir} already holds run {new['run']!r}; pass --resume to continue it, --run-name NAME for a "
                "new run, or --force to delete it and start over"
            )
        return None, True, None
    if not exists:
        if resume:
            console.print(f"train: nothing to resume in {run_dir}; starting a new run")
        return None, False, None
    old = read_json(run_dir / runs.RUN_JSON)
    diffs = [
        k for k in ("fingerprint", "tokenizer_fingerprint", "data_manifest_sha256") if old.get(k) != new[k]
    ]
    diffs += [f"config.{k}" for k in RESUME_KEYS if old["config"].get(k) != new["config"][k]]
    if diffs:
        raise ArmlabError(
            f"{run_dir}: cannot resume: its checkpoint is from another config (differs in {', '.join(diffs)}); "
            "resume with the original settings or start a new run with --run-name"
        )
    steps = engine.checkpoint_steps(run_dir)
    if not steps:
        reached = max(int(state.get("step") or 0), runs.read_metrics(run_dir).last_step or 0)
        return None, False, reached
    return steps[-1], False, None


def _check_repeats(manifest_raw: bytes, tokens: int, arm: str, allow: bool) -> None:
    """DESIGN.md invariant 7: a run that would see its arm's data more than once is refused unless
    repeats are allowed (`--allow-repeat` / `train.allow_repeat`), and then it is said plainly."""
    manifest = json.loads(manifest_raw)
    held = manifest.get("tokens")
    approx = held is None
    if held is None:
        held = int(manifest.get("chars", 0)) // 4  # ~4 chars a token for English BPE
    if not held or tokens <= held:
        return
    what = (
        f"the run consumes {tokens:,} tokens but arm {arm!r} holds {'~' if approx else ''}{held:,}: "
        f"its data would repeat about {tokens / held:.1f} times"
    )
    if not allow:
        raise ArmlabError(
            f"{what}; prepare more data for it (raise ratio or max_tokens), shorten the run, "
            f"or pass --allow-repeat (train.allow_repeat = true)"
        )
    console.print(f"[yellow]train: {what} (allowed; epochs are logged)[/]")


def _compute_dtype(device: str) -> str:
    """What the ranks will compute in (the model's rule: bf16 on CUDA from sm80 on, else fp32)."""
    from armlab.train.model import compute_dtype_for

    return str(compute_dtype_for(device)).removeprefix("torch.")
