"""Training throughput: tokens/s and MFU of the armlab GPT at a given depth on this device,
next to the loader's tokens/s per rank (which must be >= 10x what the model consumes).

    python bench/train.py --depth 4                     # CPU: fp32, eager
    python bench/train.py --depth 12 --batch-size 32    # CUDA: bf16 autocast + torch.compile
    python bench/train.py --depth 20 --batch-size 32 --no-loader

One "step" here is one micro-batch forward + backward + optimiser step of the real model and
MuonAdamW (nanochat's recipe) on random tokens, timed after warm-up steps (compilation on
CUDA). MFU = flops_per_token (armlab.budget, nanochat's formula) x tokens/s / device peak
(bf16 dense table in armlab.train.loop); blank on CPU. The loader figure comes from
bench/loader.py on real text (Python's stdlib) with the same batch and sequence length.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from armlab.budget import flops_per_token, param_counts
from armlab.spec import ModelSpec
from armlab.train.loop import peak_flops
from armlab.train.model import GPT, GPTConfig
from armlab.train.optim import build_optimizer


def model_tokens_per_s(
    depth: int,
    vocab: int,
    batch_size: int,
    seq_len: int,
    device: torch.device,
    compile: bool,
    steps: int,
    warmup: int,
) -> float:
    torch.manual_seed(0)
    cfg = GPTConfig(depth=depth, vocab_size=vocab, seq_len=seq_len)
    model = GPT(cfg).to(device)
    model.init_weights()
    opt = build_optimizer(
        model, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.2
    )
    fwd = torch.compile(model, dynamic=False) if compile else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    x = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)

    def step() -> None:
        with autocast:
            loss = fwd(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


def loader_rate(vocab: int, batch_size: int, seq_len: int, world_size: int) -> float:
    sys.path.insert(0, str(Path(__file__).parent))
    from loader import loader_tokens_per_s, stdlib_documents, train_tokenizer, write_corpus

    docs = stdlib_documents()
    tok = train_tokenizer(docs[:3000], vocab)
    with tempfile.TemporaryDirectory() as tmp:
        write_corpus(Path(tmp), docs)
        return loader_tokens_per_s(Path(tmp), tok, batch_size, seq_len, world_size=world_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 1 on CPU, 32 on CUDA")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    ap.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--no-compile", action="store_true", help="CUDA: run eager")
    ap.add_argument("--no-loader", action="store_true", help="skip the loader measurement")
    ap.add_argument("--world-size", type=int, default=8, help="ranks the loader's units are split over")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch_size or (32 if cuda else 1)
    steps = args.steps or (20 if cuda else 3)
    compile = cuda and not args.no_compile
    spec = ModelSpec(depth=args.depth, max_seq_len=args.seq_len)
    pc = param_counts(spec, args.vocab)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device: {name} | depth {args.depth} | {pc.total / 1e6:.1f}M params ({pc.scaling / 1e6:.1f}M scaling) | "
        f"batch {batch} x {args.seq_len} | {'bf16 compiled' if compile else ('bf16 eager' if cuda else 'fp32 eager')}"
    )
    rate = model_tokens_per_s(
        args.depth, args.vocab, batch, args.seq_len, device, compile, steps, warmup=3 if cuda else 1
    )
    peak = peak_flops(device)
    fpt = flops_per_token(spec, args.vocab)
    mfu = f"{100 * fpt * rate / peak:.1f}%" if peak else "- (no peak for this device)"
    print(f"model:  {rate:,.0f} tok/s per rank | {fpt * rate / 1e12:.2f} TFLOP/s | MFU {mfu}")
    if not args.no_loader:
        lrate = loader_rate(args.vocab, batch, args.seq_len, args.world_size)
        print(
            f"loader: {lrate:,.0f} tok/s per rank (world size {args.world_size}) = {lrate / rate:,.1f}x the model"
        )


if __name__ == "__main__":
    main()
