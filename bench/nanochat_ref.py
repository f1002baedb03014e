"""nanochat's own base_train as the reference throughput, at the same config as bench/train.py.

    python bench/nanochat_ref.py --nanochat ../shared/nanochat/92d63d4 --python /path/to/venv/python \\
        --depth 4 --batch-size 1 --seq-len 2048 --steps 8

It writes a scratch NANOCHAT_BASE_DIR (stdlib text as base_data_climbmix/ shards, a tokenizer of
--vocab tokens in nanochat's files), runs `python -m scripts.base_train` from the nanochat
checkout with one micro-batch per step (--total-batch-size = batch x seq), no eval, no CORE, no
sampling, and reads its per-step `dt` / `tok/sec` lines; the figure is tokens / mean dt over
the steps after the first `--warmup` (compilation). `--run=dummy` keeps W&B off; base_train
still imports wandb, so a Python without it gets a stand-in module on PYTHONPATH (never called).
`TORCHDYNAMO_DISABLE=1` in the environment runs it eagerly, as nanochat's README notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).parent))
from loader import stdlib_documents, train_tokenizer  # noqa: E402

STEP_RE = re.compile(
    r"step (\d+)/(\d+) .*?\| dt: ([\d.]+)ms \| tok/sec: ([\d,]+) \| bf16_mfu: ([\d.]+|inf|nan)"
)
WANDB_STANDIN = '''"""Stand-in for wandb: nanochat's base_train imports it; with --run=dummy it is never used."""
def init(*args, **kwargs):
    raise RuntimeError("wandb is not installed; run base_train with --run=dummy")
'''


def prepare_base_dir(base_dir: Path, vocab: int) -> Path:
    """A nanochat base dir: base_data_climbmix/ (train shard + the last one, val) and tokenizer/."""
    docs = stdlib_documents()
    data = base_dir / "base_data_climbmix"
    data.mkdir(parents=True, exist_ok=True)
    half = len(docs) * 9 // 10
    for i, chunk in enumerate((docs[:half], docs[half:])):
        pq.write_table(pa.table({"text": chunk}), data / f"shard_{i:05d}.parquet", row_group_size=256)
    tok = train_tokenizer(docs[:20_000], vocab)
    tok.save(base_dir / "tokenizer", {"source": "bench/nanochat_ref.py"})  # tokenizer.pkl + token_bytes.pt
    return base_dir


def run_base_train(
    nanochat: Path,
    python: str,
    base_dir: Path,
    depth: int,
    batch_size: int,
    seq_len: int,
    steps: int,
    device: str,
    window_pattern: str = "SSSL",
    extra_env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> tuple[list[tuple[int, float, int, float]], str]:
    """(step, dt_ms, tok_per_s, mfu) for every step base_train logged, and its whole output."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    probe = subprocess.run([python, "-c", "import wandb"], capture_output=True, env=env)
    if probe.returncode != 0:
        shim = base_dir / "wandb-standin"
        shim.mkdir(exist_ok=True)
        (shim / "wandb.py").write_text(WANDB_STANDIN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    cmd = [
        python, "-m", "scripts.base_train", "--run=dummy", f"--device-type={device}", f"--depth={depth}",
        f"--max-seq-len={seq_len}", f"--device-batch-size={batch_size}",
        f"--total-batch-size={batch_size * seq_len}", f"--num-iterations={steps}", f"--window-pattern={window_pattern}",
        "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1", "--save-every=-1",
        f"--model-tag=bench-d{depth}",
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=nanochat, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"nanochat base_train failed (exit {r.returncode}):\n{out[-3000:]}")
    rows = [(int(m[1]), float(m[3]), int(m[4].replace(",", "")), float(m[5])) for m in STEP_RE.finditer(out)]
    return rows, out


def tokens_per_s(
    rows: list[tuple[int, float, int, float]], batch_size: int, seq_len: int, warmup: int
) -> float:
    timed = [dt for step, dt, _, _ in rows if step >= warmup]
    return batch_size * seq_len / (statistics.mean(timed) / 1e3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--nanochat", type=Path, required=True, help="a nanochat checkout (e.g. the 92d63d4 snapshot)"
    )
    ap.add_argument("--python", default=sys.executable, help="a Python with nanochat's dependencies")
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="logged steps in all, warm-up included")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--window-pattern", default="SSSL")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_base_dir(Path(tmp), args.vocab)
        rows, _ = run_base_train(args.nanochat.resolve(), args.python, base, args.depth, args.batch_size,
                                 args.seq_len, args.steps, args.device, args.window_pattern)  # fmt: skip
    rate = tokens_per_s(rows, args.batch_size, args.seq_len, args.warmup)
    mfu = statistics.mean(m for s, _, _, m in rows if s >= args.warmup)
    compiled = "eager" if os.environ.get("TORCHDYNAMO_DISABLE") == "1" else "compiled"
    print(f"nanochat base_train ({args.nanochat.name}, {compiled}): {rate:,.0f} tok/s | MFU {mfu:.1f}% "
          f"| depth {args.depth} batch {args.batch_size} x {args.seq_len} | {len(rows) - args.warmup} timed steps")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"tok_per_s": rate, "mfu": mfu, "depth": args.depth,
                                         "batch_size": args.batch_size, "compiled": compiled == "compiled"}))  # fmt: skip


if __name__ == "__main__":
    main()
