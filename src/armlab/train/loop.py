"""The training loop one rank runs: nanochat 92d63d4's base_train, minus the bugs of the postmortem.

Every rank builds the same model from the same seed, reads its own share of the arm through
the loader, and steps the same optimiser on gradients averaged over all ranks (one all-reduce
per bucket of gradients after accumulation). Rank 0 logs (train.log line, metrics.jsonl,
optional W&B), evaluates bits-per-byte with every rank on a fixed sample of whole eval documents
(armlab.evaluate.bpb), and writes the checkpoints (also the last k the final evaluation scores),
which hold every rank's loader and RNG state.

The recipe is nanochat 92d63d4's: the model (armlab.train.model), MuonAdamW with its parameter
groups (armlab.train.optim), the schedules and batch/horizon scaling (armlab.train.schedule),
the defaults (armlab.train.recipe). Precision follows nanochat too: no autocast; on CUDA the
embeddings are bf16 and every Linear casts its fp32 weight to the activations' dtype.

Resume is exact on CPU: the schedules are functions of the step, the optimiser and loader
states are restored, and the loss of every later step matches an uninterrupted run bitwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from armlab import runs
from armlab.runs import RunState
from armlab.train import attention, checkpoint, recipe, schedule
from armlab.train.mfu import peak_flops
from armlab.train.model import GPTConfig, build_model, compute_dtype_for
from armlab.train.optim import MuonAdamW, build_optimizer
from armlab.train.stop import DIVERGED_LINE, STOP_LINE, StopFlag, agree, test_pause

if TYPE_CHECKING:
    from armlab.train.plan import RunPlan

STATE_EVERY_S = 10.0  # rank 0 rewrites state.json at most this often between evals/saves
GRAD_BUCKET = 1 << 25  # elements per gradient all-reduce


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device
    local_rank: int = 0  # on its node (each node's first rank reads the run's stop request)

    @property
    def master(self) -> bool:
        return self.rank == 0


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average gradients over ranks: flatten into buckets, one SUM all-reduce each, divide."""
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel()
        if size >= GRAD_BUCKET or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= world_size
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather(obj: Any, d: Dist) -> list[Any]:
    if d.world_size == 1:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def fault_injection(rank: int, step: int, model: torch.nn.Module | None = None) -> None:
    """Test-only: ARMLAB_TEST_FAIL_RANK=r ARMLAB_TEST_FAIL_STEP=s makes rank r raise at step s
    (to prove a crashing rank brings the others down with its error); ARMLAB_TEST_NAN_STEP=s
    turns a weight into NaN on every rank before step s, so step s's loss is NaN (a divergence
    without waiting for one); ARMLAB_TEST_STEP_DELAY slows every step (to kill a run mid-flight)."""
    if model is not None and os.environ.get("ARMLAB_TEST_NAN_STEP") == str(step + 1):
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    if (
        os.environ.get("ARMLAB_TEST_FAIL_RANK") == str(rank)
        and int(os.environ.get("ARMLAB_TEST_FAIL_STEP", "0")) == step
    ):
        raise RuntimeError(f"injected failure on rank {rank} at step {step} (ARMLAB_TEST_FAIL_RANK)")
    if delay := float(os.environ.get("ARMLAB_TEST_STEP_DELAY", "0")):
        time.sleep(delay)


@dataclass(frozen=True)
class Schedule:
    """What one optimiser step needs besides the model: the horizon and the resolved recipe."""

    num_iterations: int
    grad_accum_steps: int
    hp: recipe.Hyperparameters
    weight_decay: float  # Muon's scaled weight decay at step 0 (schedule.scaling)


def train_step(
    fwd: Any,
    model: torch.nn.Module,
    optimizer: MuonAdamW,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    step: int,
    sched: Schedule,
    d: Dist,
) -> tuple[float, float]:
    """One optimiser step: accumulate gradients over micro-batches, average them over ranks, set
    the step's learning rates, momentum and weight decay, step. Returns (mean loss, lr multiplier).

    `fwd` is the model or its torch.compile'd wrapper; the model's compute dtype decides the
    precision (bf16 on CUDA). The same code runs compiled and in bf16 on CPU in the tests.
    """
    accum, n = sched.grad_accum_steps, sched.num_iterations
    loss_sum = torch.zeros((), device=d.device)
    for _ in range(accum):
        x, y = next(batches)
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        loss = fwd(x, y)
        loss_sum += loss.detach()
        (loss / accum).backward()
    if d.world_size > 1:
        all_reduce_grads(list(model.parameters()), d.world_size)
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
        loss_sum /= d.world_size
    hp = sched.hp
    lrm = schedule.lr_multiplier(step, n, hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac)
    momentum = schedule.muon_momentum(step, n, hp.warmdown_ratio)
    weight_decay = schedule.weight_decay(step, n, sched.weight_decay)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = momentum
            group["weight_decay"] = weight_decay
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return (loss_sum / accum).item(), lrm  # .item() also syncs the device, so the caller's dt is real


@dataclass
class Progress:
    """Where a rank's loop is; a checkpoint records it (meta "loop") and a resume restores it."""

    step: int = 0
    time: float = 0.0  # seconds of training steps so far
    val_bpb: float | None = None  # the latest
    evaluated_at: int | None = None  # the step the latest eval ran at
    saved_at: int | None = None  # the step of the latest checkpoint
    last_loss: tuple[int, float] | None = None  # (step, loss) of the latest finite training loss

    def meta(self) -> dict[str, Any]:
        return {"time": self.time, "evaluated": self.evaluated_at == self.step, "last_loss": self.last_loss}


class RunDiverged(Exception):
    """The loss (or the weights, or the val bpb) became NaN or infinite."""


def train_loop(plan: RunPlan, d: Dist, stop: StopFlag | None = None) -> None:
    """Run (or resume) the training described by the supervisor's plan on this rank, until the
    last step, an agreed stop (armlab.train.stop) or a divergence; each ends with state.json
    written by rank 0 and a line every node's supervisor reads (see armlab.train.stop)."""
    loop = _Loop(plan, d, stop or StopFlag())
    try:
        loop.run()
    finally:
        # The loader's prefetch thread runs ahead of the loop; it must be stopped and joined before the
        # interpreter exits (a daemon thread killed inside pyarrow or the tokenizer aborts the process).
        loop.loader.close()
    if loop.wandb_run is not None:
        loop.wandb_run.finish()


class _Loop:
    """One rank's training run: setup (model, optimiser, resume, loader), then `run`."""

    def __init__(self, plan: RunPlan, d: Dist, stop: StopFlag) -> None:
        from armlab.budget import training_budget
        from armlab.evaluate.checkpoints import last_k_steps
        from armlab.tokenizer import Tokenizer
        from armlab.train.loader import DataLoader

        self.plan, self.d, self.stop = plan, d, stop
        exp, cfg = plan.experiment, plan.config
        self.train, self.cfg = exp.train, cfg
        self.n_steps = cfg.num_iterations
        self.B, self.T = cfg.device_batch_size, exp.model.max_seq_len
        device = d.device
        self.compute_dtype = compute_dtype_for(device)  # bf16 on CUDA sm80+, else fp32 (nanochat's choice)
        resume_step, compile_ = _agree_on_plan(plan, d)

        self.tokenizer = Tokenizer.load(plan.tokenizer_dir)
        torch.manual_seed(plan.seed)  # the init seed: identical initial weights on every rank
        self.model_cfg = GPTConfig.from_spec(exp.model, self.tokenizer.vocab_size)
        self.model = build_model(self.model_cfg, device, self.compute_dtype)  # on the device, nanochat's init
        hp = recipe.resolve(self.train)
        budget = training_budget(exp, vocab_size=self.tokenizer.vocab_size)
        scale = schedule.scaling(budget, hp.weight_decay)
        # compiled on CUDA, on CPU when the run is long enough to repay it (the plan's choice)
        self.optimizer = build_optimizer(self.model, **scale.learning_rates(hp), compile=compile_)
        self.sched = Schedule(self.n_steps, cfg.grad_accum_steps, hp, scale.weight_decay)

        self.progress, loader_state = Progress(), None
        if resume_step is not None:
            ckpt = checkpoint.load_checkpoint(plan.run_dir, resume_step, device)
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optim"])
            mine = ckpt["ranks"][d.rank]
            loader_state = mine["loader"]
            set_rng_state(mine["rng"])
            meta = ckpt["meta"]
            last = meta["loop"].get("last_loss")
            self.progress = Progress(
                step=meta["step"], time=meta["loop"]["time"], val_bpb=meta["val_bpb"],
                # checkpoints from before stops could skip an eval were all written after it
                evaluated_at=meta["step"] if meta["loop"].get("evaluated", True) else None,
                saved_at=meta["step"], last_loss=tuple(last) if last else None,
            )  # fmt: skip
            del ckpt
        self.start = self.progress.step
        # the last k checkpoints, which the final evaluation scores (noise; armlab.evaluate.checkpoints)
        self.keep_for_eval = set(last_k_steps(self.n_steps, exp.evaluate.last_k, exp.evaluate.last_k_every))
        self.loader = DataLoader(
            plan.data_dir,
            self.tokenizer,
            self.B,
            self.T,
            d.rank,
            d.world_size,
            seed=plan.order_seed,  # the data-order seed (train.data_seeds; else the seed)
            state=loader_state,
        )
        self.fwd = torch.compile(self.model, dynamic=False) if compile_ else self.model
        self.peak = peak_flops(device)
        self.wandb_run = _wandb(exp, plan, d) if self.train.wandb_project else None
        self.metrics = runs.MetricsLog(plan.run_dir) if d.master else None
        self.last_state = 0.0

    # -- the loop ------------------------------------------------------------------------------------
    def run(self) -> None:
        d, p, plan = self.d, self.progress, self.plan
        if d.master:
            self._banner()
        while True:
            last = p.step == self.n_steps
            reason = None
            if not last:
                test_pause(p.step)
                reason = agree(self.stop.requested(plan.run_dir, d.local_rank == 0), d.world_size, d.device)
            try:
                # a stop skips the eval that is due: the resumed run runs it (meta "evaluated")
                if (
                    reason is None
                    and (last or p.step % self.train.eval_every == 0)
                    and p.evaluated_at != p.step
                ):
                    self._evaluate()
                saving = p.step > self.start and (
                    last or p.step % self.train.save_every == 0 or p.step in self.keep_for_eval
                )
                if (saving or (reason is not None and p.step > 0)) and p.saved_at != p.step:
                    self._save()
            except RunDiverged as e:
                return self._diverged(str(e))
            if reason is not None:
                return self._stopped(reason)
            if d.master and (last or time.time() - self.last_state > STATE_EVERY_S):
                self._state(state=RunState.RUNNING, phase=runs.Phase.TRAIN)
            if last:
                return None
            try:
                self._step()
            except RunDiverged as e:
                return self._diverged(str(e))

    def _step(self) -> None:
        """One optimiser step: accumulate gradients over micro-batches, average over ranks."""
        d, p, cfg = self.d, self.progress, self.cfg
        t0 = time.perf_counter()
        fault_injection(d.rank, p.step, self.model)
        train_loss, lrm = train_step(self.fwd, self.model, self.optimizer, self.loader, p.step, self.sched, d)
        dt = time.perf_counter() - t0
        p.step += 1
        p.time += dt
        tok_per_s = cfg.total_batch_size / dt
        mfu = 100 * cfg.flops_per_token * tok_per_s / (self.peak * d.world_size) if self.peak else None
        if d.master:
            print(
                f"step {p.step:05d}/{self.n_steps:05d} | loss {train_loss:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
                f"tok/s {tok_per_s:,.0f} | mfu {'-' if mfu is None else f'{mfu:.1f}'} | epoch {self.loader.epoch:.2f}",
                flush=True,
            )
        # the loss is averaged over the ranks: every rank sees the same value, so all stop together
        if not math.isfinite(train_loss):
            raise RunDiverged(f"loss {train_loss}")
        p.last_loss = (p.step, train_loss)
        self._log(runs.MetricsRecord(
            step=p.step, tokens=p.step * cfg.total_batch_size, time=round(p.time, 3), train_loss=train_loss,
            lr_mult=lrm, dt=round(dt, 6), tok_per_s=round(tok_per_s, 1), mfu=None if mfu is None else round(mfu, 2),
            epoch=round(self.loader.epoch, 4),
        ))  # fmt: skip

    def _evaluate(self) -> None:
        from armlab.evaluate.bpb import evaluate_bpb

        d, p, plan = self.d, self.progress, self.plan
        self._state(phase=runs.Phase.EVAL)
        self.model.eval()  # eager: eval calls have several widths (armlab.evaluate.bpb)
        p.val_bpb = evaluate_bpb(
            self.model, self.tokenizer, plan.eval_dir, self.train.eval_tokens, self.B, self.T, d.device, d.rank,
            d.world_size, seed=plan.experiment.eval.seed,
        ).bpb  # fmt: skip
        self.model.train()
        p.evaluated_at = p.step
        if d.master:
            print(f"step {p.step:05d}/{self.n_steps:05d} | val bpb {p.val_bpb:.4f}", flush=True)
        if not math.isfinite(p.val_bpb):
            raise RunDiverged(f"val bpb {p.val_bpb}")
        self._log(runs.MetricsRecord(
            step=p.step, tokens=p.step * self.cfg.total_batch_size, time=round(p.time, 3), val_bpb=p.val_bpb
        ))  # fmt: skip
        self._state(phase=runs.Phase.TRAIN)

    def _save(self) -> None:
        """A checkpoint of this step, unless the weights are no longer finite (never a NaN checkpoint:
        the last one a resume or an evaluation would take must be a good one)."""
        d, p = self.d, self.progress
        if not all(bool(torch.isfinite(t).all()) for t in self.model.parameters()):
            raise RunDiverged("the weights are not finite")
        states = gather({"loader": self.loader.state_dict(), "rng": rng_state()}, d)
        if d.master:
            self._state(phase=runs.Phase.SAVE)
            checkpoint.save_checkpoint(
                self.plan.run_dir, p.step, model=self.model, optimizer=self.optimizer, rank_states=states,
                meta={
                    "model_config": self.model_cfg.to_dict(), "fingerprint": self.plan.fingerprint,
                    "config": dataclasses.asdict(self.cfg), "tokenizer_fingerprint": self.tokenizer.fingerprint,
                    "val_bpb": p.val_bpb, "loop": p.meta(),
                },
            )  # fmt: skip
            self._state(phase=runs.Phase.TRAIN)
        p.saved_at = p.step

    # -- how it ends ----------------------------------------------------------------------------------
    def _stopped(self, reason: str) -> None:
        p = self.progress
        if self.d.local_rank == 0:  # a request says why better than the signal that came with it
            reason = runs.read_stop_request(self.plan.run_dir) or reason
        resume = p.saved_at  # a stop saves first: this step, or the checkpoint it resumed from
        if self.d.master:
            self._state(state=RunState.STOPPED, phase=None, resume_step=resume, stop_reason=reason,
                        ended=time.time(), error=f"stopped by {reason} at step {p.step}")  # fmt: skip
        if self.d.local_rank == 0:
            print(STOP_LINE.format(step=p.step, reason=reason), flush=True)

    def _diverged(self, what: str) -> None:
        """End here: no checkpoint (the last one saved is the last finite model)."""
        detail = what + self._last_finite()
        if self.d.master:
            self._state(state=RunState.DIVERGED, phase=None, ended=time.time(),
                        error=f"diverged at step {self.progress.step}: {detail}")  # fmt: skip
        if self.d.local_rank == 0:
            print(DIVERGED_LINE.format(step=self.progress.step, detail=detail), flush=True)

    # -- helpers --------------------------------------------------------------------------------------
    def _last_finite(self) -> str:
        last = self.progress.last_loss
        return (
            f" (last finite loss {last[1]:.4f} at step {last[0]})" if last else " (no finite loss before it)"
        )

    def _log(self, record: runs.MetricsRecord) -> None:
        if self.metrics is not None:
            self.metrics.append(record)
        if self.wandb_run is not None:
            self.wandb_run.log(record.to_json(), step=record.step)

    def _state(self, **fields: Any) -> None:
        """state.json (rank 0 only), with the current step (and "running" unless said otherwise)."""
        fields.setdefault("state", RunState.RUNNING)
        if self.d.master:
            runs.write_state(
                self.plan.run_dir, step=self.progress.step, num_iterations=self.n_steps, **fields
            )
            self.last_state = time.time()

    def _compile_note(self) -> str:
        """Why a CPU run is compiled or eager (the plan's estimate), for people reading the log."""
        reason = self.plan.compile_reason
        if not reason or self.d.device.type != "cpu":
            return ""
        return f" ({reason})" if self.fwd is not self.model else f", eager ({reason})"

    def _banner(self) -> None:
        plan, cfg, d = self.plan, self.cfg, self.d
        exp = plan.experiment
        print(
            f"train {plan.run}: arm {plan.arm}, {d.world_size} x {d.device.type}"
            f"{f' on {plan.nnodes} nodes' if plan.nnodes > 1 else ''}, depth {exp.model.depth} "
            f"({cfg.n_params / 1e6:.1f}M params), {self.n_steps:,} steps x {cfg.total_batch_size:,} tokens "
            f"(grad accum {cfg.grad_accum_steps}), {str(self.compute_dtype).removeprefix('torch.')}"
            f"{', compiled' if self.fwd is not self.model else ''}{self._compile_note()}, "
            f"attention {attention.backend(self.compute_dtype, d.device)}",
            flush=True,
        )
        if self.start:
            print(
                f"resumed from step {self.start} ({checkpoint.checkpoint_dir(plan.run_dir, self.start)})",
                flush=True,
            )


def _agree_on_plan(plan: RunPlan, d: Dist) -> tuple[int | None, bool]:
    """(resume step, compile) of every rank: rank 0's plan decides (on a multi-node run each node
    planned on its own; its ranks must be running the same run)."""
    if d.world_size == 1:
        return plan.resume_step, plan.config.compile
    mine = [plan.fingerprint, plan.config.num_iterations, plan.resume_step, plan.config.compile]
    objs: list[Any] = [mine]
    dist.broadcast_object_list(objs, src=0)
    theirs = objs[0]
    if theirs[:2] != mine[:2]:
        from armlab.errors import ArmlabError

        raise ArmlabError(
            f"node {plan.node_rank} was started with another configuration than node 0 (fingerprint "
            f"{mine[0]}, {mine[1]} steps vs {theirs[0]}, {theirs[1]}); start every node with the same "
            "experiment file and flags"
        )
    return theirs[2], theirs[3]


def _wandb(exp: Any, plan: RunPlan, d: Dist) -> Any:
    """W&B on rank 0 when train.wandb_project is set; offline without WANDB_API_KEY."""
    if not d.master:
        return None
    try:
        import wandb
    except ImportError:
        from armlab.errors import ArmlabError

        raise ArmlabError(
            "train.wandb_project is set but wandb is not installed: pip install 'armlab[wandb]'"
        ) from None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(
        project=exp.train.wandb_project,
        name=plan.run,
        config={
            "arm": plan.arm,
            "seed": plan.seed,
            "data_seed": plan.order_seed,
            **dataclasses.asdict(plan.config),
            "fingerprint": plan.fingerprint,
        },
        dir=str(plan.run_dir),
        mode=os.environ.get("WANDB_MODE", mode),
    )
