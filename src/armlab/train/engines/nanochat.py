"""The nanochat engine: the researcher's own nanochat checkout trains the arm (`[train] engine =
"nanochat"`), on armlab's data, eval set and tokenizer, with armlab's guarantees around it.

    configure   the checkout ([nanochat] path; `[[hosts]] nanochat` on a host), its python,
                commit + diff hash, and the spec's flags checked against its base_train --help
                (nanochat_checkout, nanochat_flags): a field it lacks is one line, exit 2
    preflight   nanochat's own feed rule (row groups strided per file) and eval-set size
    command     `<python> -m scripts.base_train <flags>` (torchrun for several ranks) in the
                checkout, NANOCHAT_BASE_DIR = <run>/nanochat_base (nanochat_layout), built here
    on_output   stdout -> metrics.jsonl + state.json (nanochat_metrics); a NaN/inf loss or bpb
                raises Diverged: the supervisor stops nanochat, the run ends "diverged"
    checkpoints nanochat's own, in <run>/nanochat_base/base_checkpoints/d<depth>/; --resume passes
                --resume-from-step at the last complete one
    evaluate    armlab's own evaluation (whole-document val bpb, CORE with per-item scores) of the
                last k checkpoints on nanochat's model class, loaded in armlab's process; nanochat's
                own final val bpb kept beside it, labelled
    doctor      the checkout, its python and torch, base_train's parser, commit, GPUs, TF32

The supervisor (lease, state.json, signals, train.log, detach, exit codes) is the same as for
the built-in trainer. The run's fingerprint holds the commit, the diff hash of uncommitted
changes and the spec's flags, so runs of two commits, or of a patched and an unpatched checkout,
never compare. `train.compile = false` sets TORCHDYNAMO_DISABLE=1 (nanochat always compiles).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from armlab import runs
from armlab.errors import ArmlabError, Diverged
from armlab.progress import console
from armlab.runs import RunState
from armlab.train.engines import (
    BaseEngine,
    CheckReport,
    Command,
    EngineConfig,
    EvalRequest,
    rank_env,
    torchrun_argv,
)
from armlab.train.engines.nanochat_layout import BaseDir

if TYPE_CHECKING:
    import torch

    from armlab.budget import Budget
    from armlab.evaluate.bundle import Bundle
    from armlab.evaluate.record import CheckpointEval
    from armlab.spec import Experiment
    from armlab.train.engines.nanochat_metrics import MetricsParser
    from armlab.train.plan import RunPlan

STATE_EVERY_S = 10.0  # state.json is rewritten at most this often between evals


def model_tag(depth: int) -> str:
    """nanochat's own default tag (`d26`): its scripts find the checkpoints without --model-tag."""
    return f"d{depth}"


@dataclass(frozen=True)
class NanochatConfig(EngineConfig):
    """The checkout as `configure` found it (run.json "engine", plan.json)."""

    engine: str = "nanochat"
    path: str = ""
    python: str = ""
    python_source: str = ""
    commit: str = ""  # git commit, or content:<hash> for a directory without .git
    git: bool = False
    dirty: bool | None = None
    diff_sha256: str | None = None
    changed: tuple[str, ...] = ()
    torch: str = ""
    spec_args: tuple[str, ...] = ()  # the experiment file's flags (nanochat_flags.spec_args)
    extra_args: tuple[str, ...] = ()  # [nanochat] extra_args, verbatim, last

    @property
    def label(self) -> str:
        """How messages name the build: `48804bf`, `48804bf+dirty(1a2b3c4d)`, `content:...`."""
        from armlab.train.engines.nanochat_checkout import SourceIdentity

        return SourceIdentity(self.commit, self.git, self.dirty, self.diff_sha256).short

    def describe(self) -> str:
        return f"nanochat {self.label} at {self.path} (python {self.python}: {self.python_source})"

    def comparable(self) -> dict[str, Any]:
        from armlab.train.engines.nanochat_flags import fingerprinted

        return {
            "commit": self.commit,
            "diff_sha256": self.diff_sha256,
            "args": [*fingerprinted(list(self.spec_args)), *self.extra_args],
        }


class NanochatEngine(BaseEngine):
    def __init__(self) -> None:
        self._parser: MetricsParser | None = None
        self._metrics: runs.MetricsLog | None = None
        self._last_loss: tuple[int, float] | None = None
        self._last_state = 0.0
        self._running = False

    # -- planning ------------------------------------------------------------------------------------
    def configure(self, exp: Experiment) -> NanochatConfig:
        from armlab.train.engines.nanochat_checkout import inspect_checkout
        from armlab.train.engines.nanochat_flags import spec_args

        if not exp.nanochat.path:
            raise ArmlabError(
                "train.engine = 'nanochat' needs the checkout: set [nanochat] path = \"~/nanochat\" in the "
                "experiment file (per host: [[hosts]] nanochat), or pass --nanochat DIR"
            )
        ck = inspect_checkout(exp.nanochat.path, exp.nanochat.python)
        return NanochatConfig(
            path=str(ck.path), python=str(ck.python), python_source=ck.python_source, commit=ck.source.commit,
            git=ck.source.git, dirty=ck.source.dirty, diff_sha256=ck.source.diff_sha256,
            changed=ck.source.changed[:20], torch=ck.torch.version,
            spec_args=tuple(spec_args(exp, ck.flags, ck.source.short)), extra_args=tuple(exp.nanochat.extra_args),
        )  # fmt: skip

    def load_config(self, data: Mapping[str, Any]) -> NanochatConfig:
        fields = {f.name for f in dataclasses.fields(NanochatConfig)}
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in fields}
        return NanochatConfig(**d)

    def budget(self, exp: Experiment, vocab_size: int) -> Budget:
        """armlab's budget: nanochat is passed the batch and steps armlab planned (nanochat_flags)."""
        from armlab.budget import training_budget

        return training_budget(exp, vocab_size=vocab_size)

    def checkpoint_steps(self, run_dir: Path) -> list[int]:
        from armlab.train.engines.nanochat_layout import checkpoint_steps

        try:
            config = json.loads((Path(run_dir) / runs.RUN_JSON).read_text())["config"]
        except (OSError, ValueError, KeyError):
            return []
        return checkpoint_steps(
            BaseDir.of_run(run_dir).checkpoints(model_tag(config["depth"])), config["world_size"]
        )

    def preflight(self, plan: RunPlan) -> None:
        from armlab.train.engines.nanochat_layout import check_feeds

        files = check_feeds(plan.data_dir, plan.world_size)
        _warn_same_order(plan, len(files))
        if plan.device != "cuda" and plan.world_size > 1:
            # nanochat's compute_init joins a process group only on CUDA: N CPU ranks would train N
            # unrelated models and rank 0 would report one of them
            raise ArmlabError(
                f"nanochat trains several ranks only on CUDA (its compute_init sets up DDP for cuda alone); "
                f"on {plan.device} train one process (drop --nproc {plan.world_size}), or use engine builtin"
            )
        docs = json.loads((plan.eval_dir / "manifest.json").read_text()).get("rows")
        if docs is not None and docs < plan.world_size:
            raise ArmlabError(
                f"{plan.eval_dir}: the shared eval set holds {docs} documents, fewer than the {plan.world_size} "
                "ranks nanochat validates on; raise eval.docs and rerun `armlab prepare EXP`"
            )
        _bundle(plan.experiment)  # a bundle nanochat's in-training CORE cannot read is refused now
        if plan.device == "cpu" and plan.experiment.train.compile:
            console.print(
                "[yellow]train: nanochat torch.compiles the model on CPU too (a cold compile takes minutes); "
                "train.compile = false runs it eagerly[/]"
            )

    # -- running -------------------------------------------------------------------------------------
    def command(self, plan: RunPlan) -> Command:
        from armlab.train.engines.nanochat_flags import run_args
        from armlab.train.engines.nanochat_layout import build, place_bundle, train_files
        from armlab.train.engines.nanochat_metrics import MetricsParser

        cfg: NanochatConfig = plan.engine  # type: ignore[assignment]
        exp = plan.experiment
        base = BaseDir.of_run(plan.run_dir)
        order = build(
            base, plan.data_dir, plan.eval_dir, plan.tokenizer_dir, plan.world_size, exp.shards.row_group_rows,
            plan.order_seed,
        )  # fmt: skip
        bundle = _bundle(exp)
        place_bundle(base, bundle.root if bundle else None)
        args = run_args(
            total_batch_size=plan.config.total_batch_size, num_iterations=plan.config.num_iterations,
            device=plan.device, run=plan.run, model_tag=model_tag(exp.model.depth),
            wandb=bool(exp.train.wandb_project), core_bundle=bundle is not None, resume_step=plan.resume_step,
        )  # fmt: skip
        target = ["-m", "scripts.base_train", *cfg.spec_args, *args, *cfg.extra_args]
        env = {**rank_env(plan.device, plan.nproc_per_node), "NANOCHAT_BASE_DIR": str(base.root),
               "WANDB_DIR": str(plan.run_dir)}  # fmt: skip
        if not exp.train.compile:
            env["TORCHDYNAMO_DISABLE"] = "1"  # nanochat always calls torch.compile; this makes it a no-op
        done = [m for m in runs.read_metrics(plan.run_dir).records if "train_loss" in m]
        if done and plan.resume_step:
            self._last_loss = (done[-1]["step"], float(done[-1]["train_loss"]))
        self._parser = MetricsParser(
            tokens_per_step=plan.config.total_batch_size, train_files=len(train_files(plan.data_dir)),
            mfu=plan.device == "cuda", time=float(done[-1]["time"]) if done and plan.resume_step else 0.0,
        )  # fmt: skip
        console.print(escape(f"train: {cfg.describe()}, NANOCHAT_BASE_DIR={base.root}"))
        console.print(
            f"train: data seed {plan.order_seed}: nanochat reads {len(order)} file(s) of arm {plan.arm} in the order "
            f"{', '.join(order[:4])}{', ...' if len(order) > 4 else ''}; init is nanochat's own fixed seed (42)"
        )
        argv = torchrun_argv(
            cfg.python, target, plan.nproc_per_node, plan.master_port, plan.nnodes, plan.node_rank,
            plan.rdzv_endpoint,
        )  # fmt: skip
        return Command(argv, env, Path(cfg.path))

    def on_output(self, plan: RunPlan, line: str) -> None:
        if self._parser is None:
            return
        rec = self._parser.feed(line)
        if rec is None:
            return
        is_eval = "train_loss" not in rec
        if is_eval and plan.resume_step is not None and rec["step"] == plan.resume_step:
            return  # nanochat re-evaluates the step it resumes at; the record before the kill stands
        self._check_finite(rec)
        if self._metrics is None:
            self._metrics = runs.MetricsLog(plan.run_dir)
        self._metrics.append(runs.MetricsRecord.from_json(rec))
        now = time.time()
        if not self._running or is_eval or now - self._last_state > STATE_EVERY_S:
            runs.write_state(plan.run_dir, state=RunState.RUNNING, step=rec["step"],
                             num_iterations=plan.config.num_iterations)  # fmt: skip
            self._running, self._last_state = True, now

    def _check_finite(self, rec: dict[str, Any]) -> None:
        """A NaN/inf loss or bpb ends the run as diverged (the supervisor stops nanochat's ranks)."""
        for key in ("train_loss", "val_bpb"):
            value = rec.get(key)
            if value is None:
                continue
            if not math.isfinite(value):
                last = self._last_loss
                before = f" (last finite loss {last[1]:.4f} at step {last[0]})" if last else " (no finite loss before it)"
                name = "loss" if key == "train_loss" else "val bpb"
                raise Diverged(f"diverged at step {rec['step']}: nanochat's {name} {value}{before}")
            if key == "train_loss":
                self._last_loss = (rec["step"], value)

    def on_exit(self, plan: RunPlan, returncode: int) -> None:
        p = self._parser
        if p is None or not p.unparsed:
            return
        note = (
            f"armlab: {p.unparsed} line(s) of nanochat output looked like metrics but did not parse (kept in "
            f"this log, left out of metrics.jsonl), e.g. {p.examples[0]!r}"
        )
        runs.write_state(plan.run_dir, unparsed_lines=p.unparsed)
        with open(plan.run_dir / runs.TRAIN_LOG, "a", encoding="utf-8") as log:
            log.write(note + "\n")
        console.print(f"[yellow]{escape(note)}[/]")

    # -- after training ------------------------------------------------------------------------------
    def evaluate(self, request: EvalRequest) -> CheckpointEval:
        """armlab scores the checkpoint itself (BaseEngine: whole-document val bpb, the packed second
        number, CORE with per-item continuous scores) on nanochat's own model class, loaded in this
        process; nanochat's own val bpb at that step, as base_train logged it, is kept, labelled."""
        result = super().evaluate(request)
        step = request.step if request.step is not None else self.checkpoint_steps(request.run_dir)[-1]
        logged = [
            m["val_bpb"] for m in runs.read_metrics(request.run_dir).records
            if m.get("val_bpb") is not None and m["step"] == step
        ]  # fmt: skip
        cfg, _ = self._run_config(request.run_dir)
        note = {"nanochat_val_bpb": logged[-1] if logged else None,
                "nanochat_val_bpb_source": f"nanochat {cfg.label} base_train at step {step}: its packed val "
                f"stream over the first train.eval_tokens of the shared eval set"}  # fmt: skip
        return dataclasses.replace(result, engine={**result.engine, **note})

    def weights_files(self, run_dir: Path, step: int) -> list[Path]:
        _, info = self._run_config(run_dir)
        return [BaseDir.of_run(run_dir).checkpoints(model_tag(info["config"]["depth"])) / f"model_{step:06d}.pt"]

    def load_model(
        self, run_dir: Path, device: str | torch.device = "cpu", step: int | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """nanochat's own GPT of the run's checkpoint at `step` (None: the last), built by the checkout's
        checkpoint_manager in this process (so the checkout must import with armlab's interpreter, and
        be at the commit and patch that trained the run: its model class reads the checkpoint)."""
        import os
        import sys

        import torch

        from armlab.train.engines.nanochat_checkout import source_identity

        cfg, info = self._run_config(run_dir)
        steps = self.checkpoint_steps(run_dir)
        if not steps:
            raise ArmlabError(f"{run_dir}: no complete nanochat checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ArmlabError(f"{run_dir}: no complete nanochat checkpoint at step {step} (have {steps})")
        now = source_identity(Path(cfg.path))
        if (now.commit, now.diff_sha256) != (cfg.commit, cfg.diff_sha256):
            raise ArmlabError(
                f"nanochat {cfg.path} is now {now.short}, but the run was trained by {cfg.label}; evaluate with "
                "the checkout that trained it (check it out again): its model class must read the checkpoint"
            )
        base = BaseDir.of_run(run_dir)
        os.environ["NANOCHAT_BASE_DIR"] = str(base.root)  # nanochat's tokenizer loader reads it
        loaded = sys.modules.get("nanochat")
        if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(cfg.path):
            for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
                del sys.modules[name]  # another checkout's nanochat was imported in this process
        if cfg.path not in sys.path:
            sys.path.insert(0, cfg.path)
        try:
            from nanochat.checkpoint_manager import build_model
        except ImportError as e:
            raise ArmlabError(
                f"nanochat {cfg.path} does not import with {sys.executable} ({e}); armlab evaluates nanochat "
                "checkpoints in its own process: install what the checkout needs into armlab's environment"
            ) from None
        ckpt = base.checkpoints(model_tag(info["config"]["depth"]))
        model, _tokenizer, meta = build_model(str(ckpt), step, torch.device(device), phase="eval")
        return model, meta

    def doctor_checks(self, report: CheckReport, exp: Experiment | None) -> None:
        if exp is None or not exp.nanochat.path:
            report.add("nanochat", "fail", "train.engine = 'nanochat' but no [nanochat] path",
                       "set [nanochat] path to your nanochat clone (per host: [[hosts]] nanochat)")  # fmt: skip
            return
        doctor_checkout(report, exp.nanochat.path, exp.nanochat.python, exp)

    # -- helpers -------------------------------------------------------------------------------------
    def _run_config(self, run_dir: Path) -> tuple[NanochatConfig, dict[str, Any]]:
        info = json.loads((Path(run_dir) / runs.RUN_JSON).read_text())
        return self.load_config(info["engine"]), info


def _warn_same_order(plan: RunPlan, n_files: int) -> None:
    """Seeds vary a nanochat run only through the order of its arm's files: say when this run's
    order is another planned seed's (one file; or 2-3 files and a coinciding shuffle)."""
    from armlab.train.engines.nanochat_layout import order_collisions

    train = plan.experiment.train
    others = [train.data_seed(s) for s in train.seeds]
    same = order_collisions(n_files, plan.order_seed, others)
    if same:
        console.print(
            f"[yellow]train: arm {plan.arm} has {n_files} shard file(s); nanochat reads them in the same order for "
            f"data seed {plan.order_seed} as for {', '.join(map(str, same))}, and its init seed is fixed, so those "
            "runs will be identical (compare counts them once); prepare the arm in more files (smaller "
            "shards.rows_per_shard) or pick other train.data_seeds[/]"
        )


def _bundle(exp: Experiment) -> Bundle | None:
    """The experiment's CORE bundle for nanochat's in-training CORE (None: the experiment has none;
    a URL is fetched once into armlab's bundle cache, as `armlab evaluate` would)."""
    if exp.evaluate.bundle is None:
        return None
    from armlab.evaluate.bundle import load_bundle

    return load_bundle(exp.evaluate.bundle, sha256=exp.evaluate.core_bundle_sha256)


def doctor_checkout(report: CheckReport, path: str, python: str | None, exp: Experiment | None) -> None:
    """`armlab doctor`'s checks of a nanochat checkout: it exists, its python imports torch, its
    base_train parses --help (and takes the experiment's flags), commit and dirty state, GPUs, TF32."""
    from armlab.train.engines.nanochat_checkout import (
        base_train_flags,
        checkout_path,
        probe_torch,
        resolve_python,
        source_identity,
    )
    from armlab.train.engines.nanochat_flags import spec_args
    from armlab.train.engines.tf32 import check_tf32

    fix = "set [nanochat] path (per host: [[hosts]] nanochat) to your nanochat clone"
    try:
        root = checkout_path(path)
        py, source = resolve_python(root, python)
    except ArmlabError as e:
        report.add("nanochat checkout", "fail", str(e), fix)
        return
    ident = source_identity(root)
    if ident.dirty:
        report.add("nanochat checkout", "warn", f"{root} at {ident.short}: uncommitted changes in "
                   f"{', '.join(ident.changed[:3])}{'...' if len(ident.changed) > 3 else ''}",
                   "fine if intended: its runs compare only with runs of the same patch")  # fmt: skip
    else:
        what = ident.commit[:12] if ident.git else f"{ident.commit} (no .git: identified by its files)"
        report.add("nanochat checkout", "ok", f"{root} at {what}")
    try:
        torch = probe_torch(py, source, root)
    except ArmlabError as e:
        report.add("nanochat python", "fail", str(e), f"`uv sync` in {root}, or set [nanochat] python")
        return
    report.add("nanochat python", "ok", f"{py} ({source}): torch {torch.version}")
    have = int(getattr(report, "info", {}).get("gpus", 0) or 0)
    if have and not torch.gpus:
        report.add("nanochat gpus", "fail", f"this host has {have} GPU(s) but nanochat's torch {torch.version} sees "
                   "no CUDA device (a CPU build?)", f"install a CUDA torch into {py}'s environment")  # fmt: skip
    else:
        report.add("nanochat gpus", "ok", f"nanochat's torch sees {torch.gpus} GPU(s)")
    try:
        flags = base_train_flags(root, py, source, cached=False)
        if exp is not None:
            spec_args(exp, flags, ident.short)
    except ArmlabError as e:
        report.add("nanochat base_train", "fail", str(e), "see the message")
    else:
        report.add("nanochat base_train", "ok", f"--help parses ({len(flags)} flags)"
                   + ("; takes every flag the experiment sets" if exp is not None else ""))  # fmt: skip
    check_tf32(report, root)
