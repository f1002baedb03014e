"""The training loop one rank runs (nanochat's base_train, minus the bugs of the postmortem).

Every rank builds the same model from the same seed, reads its own share of the arm through
the loader, and steps the same optimiser on gradients averaged over all ranks (one all-reduce
per bucket of gradients after accumulation). Rank 0 logs (train.log line, metrics.jsonl,
optional W&B), evaluates bits-per-byte with every rank on the shared eval set, and writes the
checkpoints, which hold every rank's loader and RNG state.

Resume is exact on CPU: the schedules are functions of the step, the optimiser and loader
states are restored, and the loss of every later step matches an uninterrupted run bitwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from armlab import runs
from armlab.train import checkpoint, schedule
from armlab.train.model import GPT, GPTConfig
from armlab.train.optim import build_optimizer

if TYPE_CHECKING:
    from armlab.train.plan import RunPlan

# Dense bf16 peak FLOP/s per device, matched against torch.cuda.get_device_name() (first hit
# wins, so more specific names come first). Unknown devices and CPUs get no MFU.
PEAK_FLOPS = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)
STATE_EVERY_S = 10.0  # rank 0 rewrites state.json at most this often between evals/saves
GRAD_BUCKET = 1 << 25  # elements per gradient all-reduce


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


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


def train_loop(plan: RunPlan, d: Dist) -> None:
    """Run (or resume) the training described by the supervisor's plan on this rank."""
    from armlab.evaluate.bpb import evaluate_bpb
    from armlab.tokenizer import Tokenizer
    from armlab.train.loader import DataLoader

    run_dir = plan.run_dir
    exp = plan.experiment
    cfg = plan.config
    train = exp.train
    n_steps, accum = cfg.num_iterations, cfg.grad_accum_steps
    B, T = cfg.device_batch_size, exp.model.max_seq_len
    device = d.device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    tokenizer = Tokenizer.load(plan.tokenizer_dir)
    torch.manual_seed(plan.seed)  # identical initial weights on every rank
    model_cfg = GPTConfig.from_spec(exp.model, tokenizer.vocab_size)
    with device:  # allocate on the device directly (a d26 model is slow to build on CPU and copy)
        model = GPT(model_cfg)
    model.init_weights()
    scale = schedule.scaling(exp.model.depth, cfg.total_batch_size, train.weight_decay)
    optimizer = build_optimizer(
        model,
        embedding_lr=train.embedding_lr,
        unembedding_lr=train.unembedding_lr,
        matrix_lr=train.matrix_lr,
        scalar_lr=train.scalar_lr,
        weight_decay=scale.weight_decay,
        batch_lr_scale=scale.batch_lr_scale,
    )

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
        plan.data_dir, tokenizer, B, T, d.rank, d.world_size, seed=plan.seed, state=loader_state
    )
    fwd = torch.compile(model, dynamic=False) if (device.type == "cuda" and train.compile) else model

    flops_per_token = cfg.flops_per_token
    peak = peak_flops(device)
    wandb_run = _wandb(exp, plan, d) if train.wandb_project else None
    if d.master:
        print(
            f"train {plan.run}: arm {plan.arm}, {d.world_size} x {device.type}, depth {exp.model.depth} "
            f"({cfg.n_params / 1e6:.1f}M params), {n_steps:,} steps x {cfg.total_batch_size:,} tokens "
            f"(grad accum {accum}), {cfg.dtype}{', compiled' if fwd is not model else ''}",
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
                model.eval()
                with autocast:
                    val_bpb = evaluate_bpb(
                        fwd, tokenizer, plan.eval_dir, train.eval_tokens, B, T, device, d.rank, d.world_size
                    )
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
            if step > start and (last or step % train.save_every == 0):
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
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                x, y = next(loader)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast:
                    loss = fwd(x, y)
                loss_sum += loss.detach()
                (loss / accum).backward()
            if d.world_size > 1:
                all_reduce_grads(list(model.parameters()), d.world_size)
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
                loss_sum /= d.world_size
            lrm = schedule.lr_multiplier(
                step, n_steps, train.warmup_ratio, train.warmdown_ratio, train.final_lr_frac
            )
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"] * lrm
                if group["kind"] == "muon":
                    group["momentum"] = schedule.muon_momentum(step)
                    group["weight_decay"] = schedule.weight_decay(step, n_steps, scale.weight_decay)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            train_loss = (loss_sum / accum).item()  # also syncs the device, so dt is real
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
            **dataclasses.asdict(plan.config),
            "fingerprint": plan.fingerprint,
        },
        dir=str(plan.run_dir),
        mode=os.environ.get("WANDB_MODE", mode),
    )
