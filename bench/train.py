"""Training throughput: tokens/s and MFU of the built-in trainer's step at a given depth on this
device, next to the loader's tokens/s per rank and (optionally) nanochat's own base_train.

    python bench/train.py --depth 4                       # CPU: fp32, eager, batch 1 x 2048
    python bench/train.py --depth 4 --threads 1           # the CPU thread count's effect
    python bench/train.py --depth 12 --batch-size 32      # CUDA: bf16, torch.compile, FA3 if present
    python bench/train.py --depth 4 --nanochat ../shared/nanochat/92d63d4 --nanochat-python PY

One "step" is `armlab.train.loop.train_step` with one micro-batch: forward + backward of the
real model and MuonAdamW (nanochat 92d63d4's recipe) on random tokens, the schedule update and
the loss sync, timed over `--steps` after `--warmup` steps (compilation). MFU uses nanochat's
convention: FLOPs per token (armlab.budget, = nanochat's estimate_flops, sliding windows per
layer) x tokens/s / the device's dense bf16 peak (nanochat's table, armlab.train.loop); blank on
CPU. The loader figure is bench/loader.py on real text (Python's stdlib) with the same batch and
sequence length. With --nanochat, nanochat's base_train runs at the same depth, batch and
sequence length (bench/nanochat_ref.py) and the ratio armlab / nanochat is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from armlab.budget import flops_per_token, param_counts
from armlab.spec import ModelSpec, TrainSpec
from armlab.train import attention, recipe
from armlab.train.loop import Dist, Schedule, peak_flops, train_step
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
    torch.manual_seed(0)
    model = build_model(cfg, device, dtype)
    hp = recipe.resolve(TrainSpec())
    opt = build_optimizer(
        model, embedding_lr=hp.embedding_lr, unembedding_lr=hp.unembedding_lr, matrix_lr=hp.matrix_lr,
        scalar_lr=hp.scalar_lr, weight_decay=hp.weight_decay, compile=compile,
    )  # fmt: skip
    fwd = torch.compile(model, dynamic=False) if compile else model
    x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.seq_len + 1), device=device)
    batches = iter(lambda: (x[:, :-1], x[:, 1:]), None)
    sched = Schedule(10_000, 1, hp, hp.weight_decay)
    d = Dist(0, 1, device)
    for s in range(warmup):
        train_step(fwd, model, opt, batches, s, sched, d)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(warmup, warmup + steps):
        train_step(fwd, model, opt, batches, s, sched, d)  # ends with loss.item(): a device sync
    return steps * batch_size * cfg.seq_len / (time.perf_counter() - t0)


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
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
