"""Training throughput: tokens/s and MFU of the built-in trainer's step at a given depth on this
device, next to the loader's tokens/s per rank and (optionally) nanochat's own.

    python bench/train.py --depth 4                       # CPU: fp32, eager, batch 1 x 2048
    python bench/train.py --depth 4 --threads 1           # the CPU thread count's effect
    python bench/train.py --depth 12 --batch-size 32      # CUDA: bf16, torch.compile, FA3 if present
    python bench/train.py --depth 4 --threads 2 --vs-nanochat ../shared/nanochat/92d63d4 [--compile]
    python bench/train.py --quick --vs-nanochat ../shared/nanochat/92d63d4   # a 1-minute smoke of it
    python bench/train.py --depth 4 --nanochat ../shared/nanochat/92d63d4 --nanochat-python PY

One "step" is `armlab.train.loop.train_step` with one micro-batch: forward + backward of the
real model and MuonAdamW (nanochat 92d63d4's recipe) on random tokens, the schedule update and
the loss sync, timed over `--steps` after `--warmup` steps (compilation). MFU uses nanochat's
convention: FLOPs per token (armlab.budget, = nanochat's estimate_flops, sliding windows per
layer) x tokens/s / the device's dense bf16 peak (nanochat's table, armlab.train.loop); blank on
CPU. The loader figure is bench/loader.py on real text (Python's stdlib) with the same batch and
sequence length.

`--vs-nanochat DIR` is the fair comparison: nanochat's own GPT and MuonAdamW, imported from the
checkout into this process, step by step against armlab's on the same tokens and threads,
interleaved (armlab, nanochat, armlab, ...) for `--rounds` rounds, so both see the same machine
load; each side's best round and the ratio are printed (on a shared machine the best round is the
least disturbed one). `--compile` compiles both sides' models (nanochat's optimiser steps are
always compiled; armlab's follow `--compile`). `--nanochat DIR` instead runs nanochat's
base_train in a subprocess at the same config (bench/nanochat_ref.py), what a user runs.

The run's compile choice on CPU (armlab.train.compiling) is printed for `--plan-steps` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from armlab.budget import flops_per_token, param_counts
from armlab.spec import ModelSpec, TrainSpec
from armlab.train import attention, compiling, recipe
from armlab.train.loop import Dist, Schedule, train_step
from armlab.train.mfu import peak_flops
from armlab.train.model import GPTConfig, build_model, compute_dtype_for
from armlab.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).parent))


def model_tokens_per_s(
    cfg: GPTConfig,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool,
    steps: int,
    warmup: int,
) -> float:
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), device=device)
    one = armlab_step(cfg, x, device, dtype, compile)
    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()  # ends with loss.item(): a device sync
    return steps * batch_size * cfg.seq_len / (time.perf_counter() - t0)


def armlab_step(cfg: GPTConfig, x: torch.Tensor, device: torch.device, dtype: torch.dtype, compile: bool) -> Any:
    """A closure running one armlab training step (train_step with MuonAdamW) on the batch `x`."""
    torch.manual_seed(0)
    model = build_model(cfg, device, dtype)
    hp = recipe.resolve(TrainSpec())
    opt = build_optimizer(
        model, embedding_lr=hp.embedding_lr, unembedding_lr=hp.unembedding_lr, matrix_lr=hp.matrix_lr,
        scalar_lr=hp.scalar_lr, weight_decay=hp.weight_decay, compile=compile,
    )  # fmt: skip
    fwd = torch.compile(model, dynamic=False) if compile else model
    batches = iter(lambda: (x[:, :-1], x[:, 1:]), None)
    sched, d, step = Schedule(10_000, 1, hp, hp.weight_decay), Dist(0, 1, device), [0]

    def one() -> None:
        train_step(fwd, model, opt, batches, step[0], sched, d)
        step[0] += 1

    return one


def nanochat_step(checkout: Path, cfg: GPTConfig, x: torch.Tensor, compile: bool) -> Any:
    """The same step by nanochat's own GPT and MuonAdamW (imported from the checkout), as its
    base_train takes it: forward, backward, the schedule's group values, step, zero_grad, .item()."""
    os.environ.setdefault("NANOCHAT_BASE_DIR", tempfile.mkdtemp(prefix="nanochat-bench-"))
    sys.path.insert(0, str(checkout))
    import nanochat.gpt as ngpt

    hp = recipe.resolve(TrainSpec())
    with torch.device("meta"):
        model = ngpt.GPT(ngpt.GPTConfig(**cfg.nanochat_config()))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    opt = model.setup_optimizer(
        unembedding_lr=hp.unembedding_lr, embedding_lr=hp.embedding_lr, matrix_lr=hp.matrix_lr,
        weight_decay=hp.weight_decay, scalar_lr=hp.scalar_lr,
    )  # fmt: skip
    fwd = torch.compile(model, dynamic=False) if compile else model
    inputs, targets = x[:, :-1], x[:, 1:]

    def one() -> None:
        loss = fwd(inputs, targets)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"]
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = 0.95, hp.weight_decay
        opt.step()
        model.zero_grad(set_to_none=True)
        loss.item()

    return one


def interleaved(sides: dict[str, Any], tokens: int, rounds: int, warmup: int) -> dict[str, float]:
    """Best tokens/s of each side over `rounds` rounds of one step each, sides alternating."""
    for _ in range(warmup):
        for one in sides.values():
            one()
    best = dict.fromkeys(sides, 0.0)
    for r in range(rounds):
        line = []
        for name, one in sides.items():
            t0 = time.perf_counter()
            one()
            rate = tokens / (time.perf_counter() - t0)
            best[name] = max(best[name], rate)
            line.append(f"{name} {rate:,.0f}")
        print(f"  round {r + 1}/{rounds}: " + " | ".join(line) + " tok/s", flush=True)
    return best


def loader_rate(vocab: int, batch_size: int, seq_len: int, world_size: int) -> float:
    from loader import loader_tokens_per_s, stdlib_documents, train_tokenizer, write_corpus

    docs = stdlib_documents()
    tok = train_tokenizer(docs[:3000], vocab)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), docs)
        return loader_tokens_per_s(Path(tmp), tok, batch_size, seq_len, world_size=world_size)


def nanochat_rate(args: argparse.Namespace, batch: int, device: torch.device) -> tuple[float, float]:
    """(tok/s, nanochat's own MFU %) of nanochat's base_train at the same config."""
    from nanochat_ref import prepare_base_dir, run_base_train, tokens_per_s

    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_dir(Path(tmp), args.vocab)
        rows, _ = run_base_train(
            args.nanochat.resolve(), args.nanochat_python, base, args.depth, batch, args.seq_len,
            args.warmup + args.steps, device.type, args.window_pattern,
        )  # fmt: skip
    mfu = [m for s, _, _, m in rows if s >= args.warmup]
    return tokens_per_s(rows, batch, args.seq_len, args.warmup), sum(mfu) / max(len(mfu), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 32 on CUDA")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--window-pattern", default=recipe.WINDOW_PATTERN)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)"
    )
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU: torch threads (default: torch's)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the model and optimiser (default: on for CUDA, off for CPU)")  # fmt: skip
    ap.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default=None, help="default: nanochat's choice"
    )
    ap.add_argument("--no-loader", action="store_true", help="skip the loader measurement")
    ap.add_argument("--world-size", type=int, default=8, help="ranks the loader's units are split over")
    ap.add_argument(
        "--nanochat", type=Path, default=None, help="also time nanochat's base_train from this checkout"
    )
    ap.add_argument("--nanochat-python", default=sys.executable, help="Python with nanochat's dependencies")
    ap.add_argument("--vs-nanochat", type=Path, default=None,
                    help="nanochat checkout: its model and optimiser step interleaved with armlab's, in process")  # fmt: skip
    ap.add_argument("--rounds", type=int, default=None, help="--vs-nanochat rounds (default 8; --quick 3)")
    ap.add_argument("--plan-steps", type=int, default=20_000, help="steps the CPU compile choice is shown for")
    ap.add_argument("--quick", action="store_true", help="depth 2, 512 tokens, 3 rounds: a smoke run")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.depth, args.seq_len, args.rounds, args.no_loader = 2, 512, args.rounds or 3, True
    try:
        result = run(args)
    except torch.OutOfMemoryError as e:  # bench/gpu_check.sh retries with a smaller batch
        print(f"OOM: {str(e).splitlines()[0]}", flush=True)
        sys.exit(3)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def run(args: argparse.Namespace) -> dict:
    """Measure, print the figures, and return them (for --json)."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch_size or (32 if cuda else 1)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    compile = cuda if args.compile is None else args.compile
    dtype = getattr(torch, args.dtype) if args.dtype else compute_dtype_for(device)
    spec = ModelSpec(depth=args.depth, max_seq_len=args.seq_len, window_pattern=args.window_pattern)
    cfg = GPTConfig.from_spec(spec, args.vocab)
    pc = param_counts(spec, args.vocab)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name} | depth {args.depth} | {pc.total / 1e6:.1f}M params ({pc.scaling / 1e6:.1f}M scaling) | "
        f"batch {batch} x {args.seq_len} | {str(dtype).removeprefix('torch.')} "
        f"{'compiled' if compile else 'eager'} | windows {args.window_pattern} via {attention.backend(dtype, device)}",
        flush=True,
    )
    if not cuda:
        threads = torch.get_num_threads()
        probe = compiling.cpu_matmul_flops(cfg.model_dim, min(batch * args.seq_len, 4096), threads)
        fpt_step = flops_per_token(spec, args.vocab) * batch * args.seq_len
        choice = compiling.choose(True, "cpu", args.plan_steps, fpt_step, args.depth, probe)
        print(f"armlab's CPU default for a {args.plan_steps:,}-step run: {'compiled' if choice.compile else 'eager'} "
              f"({choice.reason})", flush=True)  # fmt: skip
    if args.vs_nanochat is not None:
        return versus_nanochat(args, cfg, batch, device, dtype, compile)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rate = model_tokens_per_s(cfg, batch, device, dtype, compile, args.steps, args.warmup)
    peak = peak_flops(device)
    fpt = flops_per_token(spec, args.vocab)
    mfu = f"{100 * fpt * rate / peak:.1f}%" if peak else "- (no peak for this device)"
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    mem = f" | peak memory {peak_mem:.1f} GiB" if cuda else ""
    print(
        f"model:  {rate:,.0f} tok/s per rank | {fpt * rate / 1e12:.2f} TFLOP/s | MFU {mfu}{mem}", flush=True
    )
    result = {
        "device": name, "depth": args.depth, "batch_size": batch, "seq_len": args.seq_len,
        "dtype": str(dtype).removeprefix("torch."), "compiled": compile, "window_pattern": args.window_pattern,
        "attention": attention.backend(dtype, device), "tok_per_s": rate, "flops_per_token": fpt,
        "mfu": 100 * fpt * rate / peak if peak else None, "peak_memory_gib": peak_mem,
    }  # fmt: skip
    if not args.no_loader:
        lrate = loader_rate(args.vocab, batch, args.seq_len, args.world_size)
        result["loader_tok_per_s"] = lrate
        print(
            f"loader: {lrate:,.0f} tok/s per rank (world size {args.world_size}) = {lrate / rate:,.1f}x the model",
            flush=True,
        )
    if args.nanochat is not None:
        nrate, nmfu = nanochat_rate(args, batch, device)
        result.update(nanochat_tok_per_s=nrate, nanochat_mfu=nmfu)
        print(f"nanochat base_train ({args.nanochat.name}): {nrate:,.0f} tok/s | MFU {nmfu:.1f}% (its own count) "
              f"| armlab / nanochat = {rate / nrate:.2f}")  # fmt: skip
    return result


def versus_nanochat(
    args: argparse.Namespace, cfg: GPTConfig, batch: int, device: torch.device, dtype: torch.dtype, compile: bool
) -> dict:
    """armlab's step and nanochat's, interleaved in this process (see the module docstring)."""
    if device.type != "cpu":
        raise SystemExit("--vs-nanochat runs on CPU (nanochat's step here is built for its CPU defaults)")
    x = torch.randint(0, cfg.vocab_size, (batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    sides = {"armlab": armlab_step(cfg, x, device, dtype, compile),
             "nanochat": nanochat_step(args.vs_nanochat.resolve(), cfg, x, compile)}  # fmt: skip
    rounds = args.rounds or 8
    print(f"armlab vs nanochat {args.vs_nanochat.name}, {'both compiled' if compile else 'both models eager'}, "
          f"{rounds} interleaved rounds after {max(args.warmup, 2 if compile else 1)} warm-up:", flush=True)  # fmt: skip
    best = interleaved(sides, batch * args.seq_len, rounds, max(args.warmup, 2 if compile else 1))
    ratio = best["armlab"] / best["nanochat"]
    print(f"best: armlab {best['armlab']:,.0f} tok/s | nanochat {best['nanochat']:,.0f} tok/s | "
          f"armlab / nanochat = {ratio:.2f}", flush=True)  # fmt: skip
    return {"depth": args.depth, "batch_size": batch, "seq_len": args.seq_len, "compiled": compile,
            "threads": torch.get_num_threads(), "armlab_tok_per_s": best["armlab"],
            "nanochat_tok_per_s": best["nanochat"], "ratio": ratio}  # fmt: skip


if __name__ == "__main__":
    main()
