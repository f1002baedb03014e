"""Benchmark `armlab prepare` of a remote pool over a real HTTP server: bytes sent and wall time,
for `[pool] fetch = "columns"` (column-pruned ranged reads) and `"files"` (whole downloads).

    python bench/remote.py                 # ~200 MB pool, unthrottled loopback
    python bench/remote.py --rate 100      # the server's link limited to 100 MB/s (all connections)
    python bench/remote.py --rows 8000     # quick look

The pool has the shape of airtrain-ai/fineweb-edu-fortified (its dataset card's columns: text,
id, dump, url, file_path, language, language_score, token_count, score, int_score, embedding
as 768 float32, count), snappy-compressed like the hub's parquet, `--row-group` rows a group.
Texts are lognormal in length (median ~2,700 chars, mean ~3,700, like fineweb-edu) and drawn from a Zipfian
vocabulary of 50,000 made-up words, which snappy compresses about as much as English prose
(~1.9x, printed); the embedding is random, so as incompressible as real ones. That makes ~5 KB a row,
as on the card (55.6 GB / 10.8M rows for CC-MAIN-2013-20).

The server is `tests/http_util.PoolServer`: aiohttp's web server (a well-kept Python server,
the same one the tests use, so no root or system package is needed) serving the directory
like nginx's autoindex, with Range parsed by aiohttp and answered 206. It counts the body bytes
it writes and, with --rate, holds every connection to one shared token bucket (a link of that
speed, not a per-connection cap). armlab lists the pool from the index page (`http://host/`),
then HEADs each file.

Each line is the median of --repeat runs by wall time (a shared machine varies by 30% or more).
Every mode runs the same experiment (random 16.5% + top 16.5% by score, a 2,000-doc eval
holdout, a tokenizer sample, shuffled shards) in a fresh workdir, and the shards are compared
by sha256 with a prepare of the same files from local disk.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from http_util import PoolServer  # noqa: E402

DUMPS = ["CC-MAIN-2013-20", "CC-MAIN-2013-48", "CC-MAIN-2014-10", "CC-MAIN-2014-15"]


def vocabulary(rng: np.random.Generator, n: int = 50_000) -> np.ndarray:
    """Made-up words, 2-12 letters (English-like lengths), letters weighted like English."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = 1.0 / np.arange(1, 27) ** 0.9
    lengths = np.clip(rng.poisson(5.0, size=n), 2, 12)
    idx = rng.choice(26, size=int(lengths.sum()), p=freq / freq.sum())
    flat = letters[idx]
    cuts = np.cumsum(lengths)[:-1]
    return np.array(["".join(w) for w in np.split(flat, cuts)])


def text_stream(rng: np.random.Generator, nbytes: int) -> np.ndarray:
    """`nbytes` of Zipf-distributed words (P(rank r) ~ r^-1.15, chosen so that snappy compresses
    the text 1.9x, as it does English prose) with some punctuation, as uint8."""
    vocab = vocabulary(rng)
    n_words = nbytes // 5
    p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.15
    words = vocab[rng.choice(len(vocab), size=n_words, p=p / p.sum())].astype(object)
    ends = rng.random(n_words)
    words[ends < 0.06] += "."
    words[(ends >= 0.06) & (ends < 0.11)] += ","
    return np.frombuffer(" ".join(words.tolist()).encode()[:nbytes], dtype=np.uint8)


def make_pool(out: Path, rows: int, n_files: int, row_group: int, compression: str, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = text_stream(rng, 64 << 20)
    out.mkdir(parents=True, exist_ok=True)
    per_file = -(-rows // n_files)
    for f in range(n_files):
        n = min(per_file, rows - f * per_file)
        lengths = np.clip(rng.lognormal(np.log(2700), 0.8, size=n), 200, 100_000).astype(np.int64)
        starts = rng.integers(0, len(base) - 100_001, size=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        text = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(base[idx])).cast(
            pa.string()
        )
        first = f * per_file
        score = np.clip(rng.normal(2.6, 0.7, size=n), 0, 5)
        emb = rng.standard_normal((n, 768), dtype=np.float32)
        table = pa.table(
            {
                "text": text,
                "id": [f"<urn:uuid:{seed:04x}{first + i:012x}-bench>" for i in range(n)],
                "dump": [DUMPS[f % len(DUMPS)]] * n,
                "url": [f"http://example{i % 977}.org/articles/{first + i}.html" for i in range(n)],
                "file_path": [f"s3://commoncrawl/crawl-data/{DUMPS[f % len(DUMPS)]}/segments/{f:05d}.warc.gz"]
                * n,
                "language": ["en"] * n,
                "language_score": rng.uniform(0.9, 1.0, size=n),
                "token_count": (lengths // 4).astype(np.int64),
                "score": score,
                "int_score": np.round(score).astype(np.int64),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 768).cast(
                    pa.list_(pa.float32())
                ),
                "count": rng.integers(1, 5, size=n),
            }
        )
        pq.write_table(
            table, out / f"train-{f:05d}.parquet", row_group_size=row_group, compression=compression
        )


def pool_summary(pool: Path) -> tuple[int, int, dict[str, int]]:
    """(files bytes, rows, compressed bytes by column) from the footers."""
    total, rows, by_col = 0, 0, {}
    for p in sorted(pool.glob("*.parquet")):
        total += p.stat().st_size
        md = pq.read_metadata(p)
        rows += md.num_rows
        for rg in range(md.num_row_groups):
            for i in range(md.num_columns):
                c = md.row_group(rg).column(i)
                name = c.path_in_schema.split(".")[0]
                by_col[name] = by_col.get(name, 0) + c.total_compressed_size
    return total, rows, by_col


def experiment(uri: str, workdir: Path, fetch: str) -> str:
    return textwrap.dedent(f"""
        name = "bench-remote"
        workdir = "{workdir}"
        [pool]
        uri = "{uri}"
        id_column = "id"
        token_count_column = "token_count"
        fetch = "{fetch}"
        [eval]
        docs = 2000
        [tokenizer]
        train_chars = 5_000_000
        [shards]
        rows_per_shard = 4000
        row_group_rows = 1024
        [[arms]]
        name = "random16.5"
        kind = "random"
        ratio = 0.165
        seed = 42
        [[arms]]
        name = "top16.5"
        kind = "top"
        ratio = 0.165
        score_column = "score"
    """)


def shard_shas(wd: Path) -> dict[str, str]:
    return {
        str(p.relative_to(wd)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(wd.rglob("shard_*.parquet"))
    }


def prepare(tmp: Path, name: str, uri: str, fetch: str, workers: int) -> tuple[float, dict[str, str]]:
    d = tmp / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    (d / "exp.toml").write_text(experiment(uri, d / "wd", fetch))
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(d / "exp.toml")]
    t0 = time.perf_counter()
    res = subprocess.run([*cmd, "--workers", str(workers)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"prepare ({name}) failed:\n{res.stderr[-3000:]}")
    return wall, shard_shas(d / "wd")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000, help="pool rows (default 40,000: ~200 MB)")
    ap.add_argument("--files", type=int, default=8, help="pool files")
    ap.add_argument("--row-group", type=int, default=1_000, help="rows per row group of the pool files")
    ap.add_argument("--compression", default="snappy", choices=["snappy", "zstd"])
    ap.add_argument("--rate", type=float, default=None, metavar="MBPS", help="server link speed, MB/s")
    ap.add_argument("--workers", type=int, default=2, help="armlab prepare --workers")
    ap.add_argument("--repeat", type=int, default=3, help="runs per mode; the median wall time is shown")
    ap.add_argument("--tmp", default=None, help="where the pool and workdirs go (default: system temp)")
    args = ap.parse_args()
    if args.tmp:
        Path(args.tmp).mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="armlab-bench-remote-", dir=args.tmp) as tmp_s:
        tmp = Path(tmp_s)
        pool = tmp / "pool"
        make_pool(pool, args.rows, args.files, args.row_group, args.compression)
        total, rows, by_col = pool_summary(pool)
        text_raw = sum(pq.read_table(p, columns=["text"]).column(0).nbytes for p in pool.glob("*.parquet"))
        print(
            f"# pool: {args.files} files, {rows:,} rows, {total / 1e6:,.1f} MB ({total / rows / 1e3:.2f} KB a row), "
            f"{args.compression}, {args.row_group:,}-row groups"
        )
        shares = ", ".join(
            f"{c} {b / total:.0%}" for c, b in sorted(by_col.items(), key=lambda kv: -kv[1])[:4]
        )
        print(f"# column bytes: {shares}; text compresses {text_raw / by_col['text']:.2f}x")
        link = f"{args.rate:g} MB/s shared by all connections" if args.rate else "unthrottled"
        print(f"# server: aiohttp on 127.0.0.1 (Range -> 206), link {link}; armlab --workers {args.workers}")
        print(f"{'mode':<8} {'sent MB':>9} {'sent / file bytes':>18} {'requests':>9} {'wall s':>7}  shards")
        walls = [prepare(tmp, "local", str(pool), "columns", args.workers) for _ in range(args.repeat)]
        wall, local = sorted(walls, key=lambda w: w[0])[len(walls) // 2]
        print(
            f"{'local':<8} {'-':>9} {'-':>18} {'-':>9} {wall:7.1f}  {len(local)} shards (reference)",
            flush=True,
        )
        rate = args.rate * 1e6 if args.rate else None
        for fetch in ("columns", "files"):
            runs = []
            for _ in range(args.repeat):
                with PoolServer(pool, rate=rate) as server:
                    wall, shas = prepare(tmp, fetch, f"{server.url}/", fetch, args.workers)
                    runs.append((wall, server.log.sent, len(server.log.hits), shas == local))
            wall, sent, hits, _ = sorted(runs)[len(runs) // 2]
            same = "byte-identical to local" if all(r[3] for r in runs) else "DIFFER from local"
            print(
                f"{fetch:<8} {sent / 1e6:9.1f} {sent / total:17.3f}x {hits:9,} {wall:7.1f}  {same}",
                flush=True,
            )


if __name__ == "__main__":
    main()
