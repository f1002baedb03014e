"""Loader throughput: tokens/s one rank's DataLoader delivers (read + tokenize + best-fit pack).

The loader must outrun the model by >= 10x (issue 4). This prints the loader's tokens/s per rank
next to a floor measured in the same run, tiktoken's encode alone on the same documents, so the
cost of reading and packing is visible.

    python bench/loader.py                                  # synthetic corpus from Python's own files
    python bench/loader.py --data-dir ARM_DATA --tokenizer-dir WORKDIR/tokenizer --world-size 8

Without --data-dir it writes shards of real text (the stdlib's .py/.txt/.rst files cut into
documents of web-like lengths) to a temp dir and trains a tokenizer of --vocab on them.
`loader_tokens_per_s` is importable (bench/train.py compares it with the model's rate).
"""

from __future__ import annotations

import argparse
import random
import sysconfig
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.tokenizer import Tokenizer
from armlab.train.loader import DataLoader


def loader_tokens_per_s(
    data_dir: str | Path,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    world_size: int = 1,
    rank: int = 0,
    steps: int = 20,
    threads: int = 4,
) -> float:
    """Tokens (B*T per batch) per second from one rank's loader, after one warm-up batch."""
    loader = DataLoader(
        data_dir,
        tokenizer,
        batch_size,
        seq_len,
        rank=rank,
        world_size=world_size,
        threads=threads,
        prefetch=0,
    )
    next(loader)
    t0 = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * batch_size * seq_len / (time.perf_counter() - t0)


def exposed_wait_ms(
    data_dir: Path,
    tokenizer: Tokenizer,
    batch_size: int,
    seq_len: int,
    step_ms: float,
    prefetch: int,
    steps: int = 10,
) -> float:
    """Mean time the training loop waits in next(loader) when each step's compute takes step_ms.

    The compute is a sleep (like waiting on a CUDA sync: the GIL is free), so with prefetch the
    next batch is made meanwhile and the wait is ~0; without it the loop pays the loader's time.
    """
    loader = DataLoader(data_dir, tokenizer, batch_size, seq_len, prefetch=prefetch)
    next(loader)
    waited = 0.0
    for _ in range(steps):
        time.sleep(step_ms / 1e3)
        t0 = time.perf_counter()
        next(loader)
        waited += time.perf_counter() - t0
    loader.close()
    return waited / steps * 1e3


def stdlib_documents(seed: int = 0) -> list[str]:
    """Real text from Python's install cut into documents of log-normal length (median ~2.5k chars)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p
        for ext in ("*.py", "*.txt", "*.rst")
        for p in root.rglob(ext)
        if not {"test", "site-packages"} & set(p.parts)
    )
    rng = random.Random(seed)
    docs: list[str] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        while text.strip():
            n = max(200, int(rng.lognormvariate(7.8, 0.9)))
            docs.append(text[:n])
            text = text[n:]
    rng.shuffle(docs)
    return [d for d in docs if d.strip()]


def write_corpus(out: Path, docs: list[str], rows_per_shard: int = 2048, row_group_rows: int = 256) -> None:
    """Shards of the documents, in small row groups so that the ~4.5k stdlib documents feed 8 ranks."""
    out.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(docs), rows_per_shard):
        table = pa.table({"text": docs[i : i + rows_per_shard]})
        path = out / f"shard_{i // rows_per_shard:05d}.parquet"
        pq.write_table(table, path, row_group_size=row_group_rows, compression="zstd")


def train_tokenizer(docs: list[str], vocab_size: int) -> Tokenizer:
    import rustbpe

    from armlab.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(docs), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    return Tokenizer.from_merges(
        {bytes(k): v for k, v in trainer.get_mergeable_ranks()}, trainer.get_pattern()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, help="a prepared arm's data dir (default: synthetic corpus)")
    ap.add_argument("--tokenizer-dir", type=Path, help="a trained tokenizer dir (default: train one)")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        docs = None
        data_dir = args.data_dir
        if data_dir is None:
            docs = stdlib_documents()
            data_dir = Path(tmp) / "data"
            write_corpus(data_dir, docs)
            print(f"corpus: {len(docs):,} docs, {sum(map(len, docs)) / 1e6:.1f} M chars (stdlib text)")
        if args.tokenizer_dir:
            tok = Tokenizer.load(args.tokenizer_dir)
        else:
            docs = docs or pq.read_table(data_dir, columns=["text"]).column(0).to_pylist()
            t0 = time.perf_counter()
            tok = train_tokenizer(docs[:20_000], args.vocab)
            print(f"tokenizer: vocab {tok.vocab_size:,} trained in {time.perf_counter() - t0:.1f}s")

        # floor: tiktoken alone on ~4 row groups of documents (a few M tokens), same thread count
        first = pq.ParquetFile(sorted(data_dir.glob("shard_*.parquet"))[0])
        groups = range(min(4, first.num_row_groups))
        texts = first.read_row_groups(list(groups), columns=["text"]).column(0).to_pylist()
        t0 = time.perf_counter()
        n_tokens = sum(map(len, tok.encode(texts, num_threads=args.threads)))
        encode_rate = n_tokens / (time.perf_counter() - t0)
        chars_per_token = sum(map(len, texts)) / n_tokens

        rate = loader_tokens_per_s(
            data_dir, tok, args.batch_size, args.seq_len, args.world_size, 0, args.steps, args.threads
        )
        print(f"B={args.batch_size} T={args.seq_len} world_size={args.world_size} threads={args.threads}")
        print(f"tiktoken encode alone : {encode_rate:>12,.0f} tokens/s")
        print(
            f"loader, one rank      : {rate:>12,.0f} tokens/s delivered ({rate * chars_per_token / 1e6:.1f} M chars/s; "
            "cropped tokens are read but not delivered)"
        )
        batch_ms = args.batch_size * args.seq_len / rate * 1e3
        step_ms = 2 * batch_ms  # a model step twice as long as making one batch
        for prefetch in (0, 2):
            wait = exposed_wait_ms(data_dir, tok, args.batch_size, args.seq_len, step_ms, prefetch)
            print(
                f"prefetch={prefetch}: loop waits {wait:7.1f} ms per batch in next(loader) "
                f"(a batch takes {batch_ms:.0f} ms to make, a simulated model step {step_ms:.0f} ms)"
            )


if __name__ == "__main__":
    main()
