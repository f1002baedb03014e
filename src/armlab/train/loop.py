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
import json
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
from armlab.train import attention, checkpoint, recipe, schedule
from armlab.train.model import GPTConfig, build_model, compute_dtype_for
from armlab.train.optim import MuonAdamW, build_optimizer

if TYPE_CHECKING:
    from armlab.train.plan import RunPlan

# Dense bf16 peak FLOP/s per device, nanochat 92d63d4's table (nanochat/common.py get_peak_flops):
# every pattern must occur in the lower-cased torch.cuda.get_device_name(); the first row that
# matches wins, so more specific names come first. Unknown devices and CPUs get no MFU.
PEAK_FLOPS = (
    (("gb200",), 2.5e15),
    (("grace blackwell",), 2.5e15),
    (("b200",), 2.25e15),
    (("b100",), 1.8e15),
    (("h200", "nvl"), 836e12),
    (("h200", "pcie"), 836e12),
    (("h200",), 989e12),
    (("h100", "nvl"), 835e12),
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),
    (("h800", "nvl"), 989e12),
    (("h800",), 756e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("a40",), 149.7e12),
    (("a30",), 165e12),
    (("l40s",), 362e12),
    (("l40-s",), 362e12),
    (("l40 s",), 362e12),
    (("l4",), 121e12),
    (("mi355",), 2.5e15),
    (("mi325",), 1.3074e15),
    (("mi300x",), 1.3074e15),
    (("mi300a",), 980.6e12),
    (("mi250x",), 383e12),
    (("mi250",), 362.1e12),
    (("5090",), 209.5e12),
    (("4090",), 165.2e12),
    (("3090",), 71e12),
)
STATE_EVERY_S = 10.0  # rank 0 rewrites state.json at most this often between evals/saves
GRAD_BUCKET = 1 << 25  # elements per gradient all-reduce


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((flops for keys, flops in PEAK_FLOPS if all(k in name for k in keys)), None)


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

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


def fault_injection(rank: int, step: int) -> None:
    """Test-only: ARMLAB_TEST_FAIL_RANK=r ARMLAB_TEST_FAIL_STEP=s makes rank r raise at step s
    (to prove a crashing rank brings the others down with its error); ARMLAB_TEST_STEP_DELAY
    slows every step (to kill a run mid-flight)."""
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


def train_loop(plan: RunPlan, d: Dist) -> None:
    """Run (or resume) the training described by the supervisor's plan on this rank."""
    from armlab.budget import training_budget
    from armlab.evaluate.bpb import evaluate_bpb
    from armlab.evaluate.checkpoints import last_k_steps
    from armlab.tokenizer import Tokenizer
    from armlab.train.loader import DataLoader

    run_dir = plan.run_dir
    exp = plan.experiment
    cfg = plan.config
    train = exp.train
    n_steps, accum = cfg.num_iterations, cfg.grad_accum_steps
    B, T = cfg.device_batch_size, exp.model.max_seq_len
    device = d.device
    compute_dtype = compute_dtype_for(device)  # bf16 on CUDA sm80+, else fp32 (nanochat's choice)

    tokenizer = Tokenizer.load(plan.tokenizer_dir)
    torch.manual_seed(plan.seed)  # the init seed: identical initial weights on every rank
    model_cfg = GPTConfig.from_spec(exp.model, tokenizer.vocab_size)
    model = build_model(model_cfg, device, compute_dtype)  # on the device directly, nanochat's init
    hp = recipe.resolve(train)
    budget = training_budget(exp, vocab_size=tokenizer.vocab_size)
    scale = schedule.scaling(budget, hp.weight_decay)
    optimizer = build_optimizer(model, **scale.learning_rates(hp))
    sched = Schedule(n_steps, accum, hp, scale.weight_decay)

    # the last k checkpoints, which the final evaluation scores (noise; armlab.evaluate.checkpoints)
    keep_for_eval = set(last_k_steps(n_steps, exp.evaluate.last_k, exp.evaluate.last_k_every))
    start, loop_time, loader_state, val_bpb = 0, 0.0, None, None
    if plan.resume_step is not None:
        ckpt = checkpoint.load_checkpoint(run_dir, plan.resume_step, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optim"])
        mine = ckpt["ranks"][d.rank]
        loader_state = mine["loader"]
        set_rng_state(mine["rng"])
        start, loop_time, val_bpb = (
            ckpt["meta"]["step"],
            ckpt["meta"]["loop"]["time"],
            ckpt["meta"]["val_bpb"],
        )
        del ckpt
    loader = DataLoader(
        plan.data_dir, tokenizer, B, T, d.rank, d.world_size, seed=plan.order_seed, state=loader_state
    )
    fwd = torch.compile(model, dynamic=False) if (device.type == "cuda" and train.compile) else model

    flops_per_token = cfg.flops_per_token
    peak = peak_flops(device)
    wandb_run = _wandb(exp, plan, d) if train.wandb_project else None
    if d.master:
        print(
            f"train {plan.run}: arm {plan.arm}, {d.world_size} x {device.type}, depth {exp.model.depth} "
            f"({cfg.n_params / 1e6:.1f}M params), {n_steps:,} steps x {cfg.total_batch_size:,} tokens "
            f"(grad accum {accum}), {str(compute_dtype).removeprefix('torch.')}{', compiled' if fwd is not model else ''}"
            f", attention {attention.backend(compute_dtype, device)}",
            flush=True,
        )
        if start:
            print(f"resumed from step {start} ({checkpoint.checkpoint_dir(run_dir, start)})", flush=True)
    last_state = 0.0

    def log(record: dict[str, Any]) -> None:
        with open(run_dir / runs.METRICS_JSONL, "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])

    # The loader's prefetch thread runs ahead of the loop; it must be stopped and joined before the
    # interpreter exits (a daemon thread killed inside pyarrow or the tokenizer aborts the process).
    try:
        step = start
        while True:
            last = step == n_steps
            fresh = (
                step != start or plan.resume_step is None
            )  # the resume step was evaluated and saved already
            if fresh and (last or step % train.eval_every == 0):
                model.eval()  # eager: eval calls have several widths (armlab.evaluate.bpb)
                val_bpb = evaluate_bpb(
                    model, tokenizer, plan.eval_dir, train.eval_tokens, B, T, device, d.rank, d.world_size,
                    seed=exp.eval.seed,
                ).bpb  # fmt: skip
                model.train()
                if d.master:
                    print(f"step {step:05d}/{n_steps:05d} | val bpb {val_bpb:.4f}", flush=True)
                    log(
                        {
                            "step": step,
                            "tokens": step * cfg.total_batch_size,
                            "time": round(loop_time, 3),
                            "val_bpb": val_bpb,
                        }
                    )
            if step > start and (last or step % train.save_every == 0 or step in keep_for_eval):
                states = gather({"loader": loader.state_dict(), "rng": rng_state()}, d)
                if d.master:
                    checkpoint.save_checkpoint(
                        run_dir,
                        step,
                        model=model,
                        optimizer=optimizer,
                        rank_states=states,
                        meta={
                            "model_config": model_cfg.to_dict(),
                            "fingerprint": plan.fingerprint,
                            "config": dataclasses.asdict(cfg),
                            "tokenizer_fingerprint": tokenizer.fingerprint,
                            "val_bpb": val_bpb,
                            "loop": {"time": loop_time},
                        },
                    )
            if d.master and (last or time.time() - last_state > STATE_EVERY_S):
                runs.write_state(run_dir, state="running", step=step, num_iterations=n_steps)
                last_state = time.time()
            if last:
                break

            # One optimiser step: accumulate gradients over micro-batches, average over ranks.
            t0 = time.perf_counter()
            fault_injection(d.rank, step)
            train_loss, lrm = train_step(fwd, model, optimizer, loader, step, sched, d)
            dt = time.perf_counter() - t0
            step += 1
            loop_time += dt
            tok_per_s = cfg.total_batch_size / dt
            mfu = 100 * flops_per_token * tok_per_s / (peak * d.world_size) if peak else None
            if d.master:
                mfu_s = f"{mfu:.1f}" if mfu is not None else "-"
                print(
                    f"step {step:05d}/{n_steps:05d} | loss {train_loss:.4f} | lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | "
                    f"tok/s {tok_per_s:,.0f} | mfu {mfu_s} | epoch {loader.epoch:.2f}",
                    flush=True,
                )
                log(
                    {
                        "step": step,
                        "tokens": step * cfg.total_batch_size,
                        "time": round(loop_time, 3),
                        "train_loss": train_loss,
                        "lr_mult": lrm,
                        "dt": round(dt, 6),
                        "tok_per_s": round(tok_per_s, 1),
                        "mfu": None if mfu is None else round(mfu, 2),
                        "epoch": round(loader.epoch, 4),
                    }
                )
    finally:
        loader.close()
    if wandb_run is not None:
        wandb_run.finish()


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
