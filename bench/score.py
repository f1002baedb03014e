"""Benchmark `armlab score` against the plainest way to run each model over the same documents.

    python bench/score.py               # fasttext, hf (CPU) and head, 2 workers, 3 rounds
    python bench/score.py --quick       # a smaller pool, 2 rounds: a quick look
    python bench/score.py --gpu         # also the hf scorer on a BERT-base-sized model, per GPU (CUDA only)

The pool: Python's own text files cut into documents of log-normal length (bench/loader.py:
median ~2.4k chars, a long tail; web text's shape), in parquet files with an `id` and a 768-float
`embedding` per document (fineweb-edu-fortified's shape). Each contender runs on `--workers`
processes over the same documents; the goals are issue 18's:

- fasttext: `armlab score` (read the pool, DCLM's preprocessing, predict, keys, write sidecars)
  vs fastText's own predict (the binding `model.f.predict(line + "\\n", 1, 0.0, "strict")`, what
  its `model.predict` calls; DCLM's preprocessing) over the same texts, read by pyarrow,
  one process per worker. Goal >= 0.9x.
- hf on CPU: `armlab score` (length-sorted batches) vs a plain `transformers` text-classification
  pipeline (`function_to_apply="none"`, the same batch size and truncation), documents in file
  order, one single-threaded process per worker, each with its share of the files. The model is a
  random BERT of 4 layers, width 256, WordPiece vocab of 8k trained on the corpus, max_length 512.
  Goal >= 1.5x (from no padding waste).
- head: `armlab score` with a linear head over the embeddings vs reading the embedding column
  alone (pyarrow, then a float32 matrix), one process per worker. Goal >= 0.8x.
- --gpu: the hf scorer on a BERT-base-sized random model (12 layers, width 768) in bf16 on every
  GPU, docs/s per GPU, and the pipeline on one GPU at the same batch size for comparison.

Every figure is wall time of the whole job (processes started, models loaded, everything read and
written), best of `--rounds`, the two contenders of a line interleaved round by round (the machine
is shared: their ratio is what to read). Model load is part of it: bigger pools amortise it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from loader import stdlib_documents  # noqa: E402
from score_util import demo_documents, make_bert, make_head, train_fasttext  # noqa: E402

DIM = 768


def write_pool(root: Path, docs: list[str], files: int, rows_per_group: int = 1024) -> list[Path]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    bounds = np.linspace(0, len(docs), files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        emb = rng.normal(size=((hi - lo) * DIM,)).astype(np.float32)
        table = pa.table(
            {
                "id": [f"doc-{i:08d}" for i in range(lo, hi)],
                "text": docs[lo:hi],
                "embedding": pa.ListArray.from_arrays(np.arange(0, (hi - lo + 1) * DIM, DIM, dtype=np.int32), emb),
            }
        )
        path = root / f"part-{f:03d}.parquet"
        pq.write_table(table, path, row_group_size=rows_per_group, compression="zstd")
        paths.append(path)
    return paths


def web_mix(corpus: list[str], n: int, model_dir: Path, median: float = 400, sigma: float = 1.0) -> list[str]:
    """`n` documents whose lengths in the model's tokens are log-normal, median `median`, sigma
    `sigma` (general web text's shape: FineWeb / DCLM-pool documents run ~400 tokens at the
    median with a long tail; fineweb-edu's run longer), cut from the corpus' text. Prints the
    lengths as the tokenizer counts them and the share truncated at 512."""
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()  # the 200k-char sample is longer than 512 tokens: on purpose
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "\n".join(corpus)
    sample = text[:200_000]
    chars_per_token = len(sample) / len(tok(sample, add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(0)
    want = np.exp(rng.normal(np.log(median), sigma, size=n))
    docs, at = [], 0
    for t in want:
        c = max(20, int(t * chars_per_token))
        if at + c > len(text):
            at = 0
        docs.append(text[at : at + c])
        at += c
    got = np.array([len(x) for x in tok(docs, add_special_tokens=True)["input_ids"]])
    print(
        f"hf pool: {n:,} docs of log-normal length (median {median:.0f} tokens, sigma {sigma}): tokens p10/p50/p90 "
        f"{np.percentile(got, 10):,.0f}/{np.percentile(got, 50):,.0f}/{np.percentile(got, 90):,.0f}, "
        f"{(got > 512).mean():.0%} truncated at max_length 512"
    )
    return docs


def experiment(root: Path, scorer: str, batch_size: int) -> Path:
    text = f"""name = "bench-score"
workdir = "{root}/wd"
[pool]
uri = "{root}/pool/*.parquet"
id_column = "id"
[[scorers]]
name = "ft"
kind = "fasttext"
model = "{root}/quality.bin"
label = "__label__hq"
[[scorers]]
name = "hf"
kind = "hf"
model = "{root}/bert"
max_length = 512
batch_size = {batch_size}
[[scorers]]
name = "head"
kind = "head"
model = "{root}/head.safetensors"
column = "embedding"
[[arms]]
name = "r"
kind = "random"
ratio = 0.5
"""
    path = root / "exp.toml"
    path.write_text(text)
    return path


# -- the armlab side ---------------------------------------------------------------------------------
def armlab_score(exp_file: Path, scorer: str, workers: int) -> float:
    """Seconds for `score(exp, [scorer])` in this process from a clean scores dir: forking the
    workers, reading the pool, scoring, writing the sidecars and the manifest. `score` loads the
    model in this process before it forks (once: later rounds find it loaded), as the plain side
    loads its model before its pool forks: both lines time reading + scoring (+ writing), not
    interpreter start-up, imports or model loading (a fixed cost that a real pool amortises)."""
    from armlab.data.score.run import ScoreOptions, score
    from armlab.spec import load_experiment

    shutil.rmtree(exp_file.parent / "wd" / "scores" / scorer, ignore_errors=True)
    exp = load_experiment(exp_file)
    t0 = time.perf_counter()
    score(exp, names=[scorer], options=ScoreOptions(workers=workers, device="cpu"))
    return time.perf_counter() - t0


# -- the plain contenders (one process per worker, each with its share of the files) ---------------
MODEL: dict[str, object] = {}  # loaded in the parent before the fork, as `score` does


def load_fasttext(path: str) -> None:
    import fasttext
    import fasttext.FastText

    fasttext.FastText.eprint = lambda *_a, **_k: None
    MODEL["ft"] = fasttext.load_model(path)


def load_pipeline(path: str, device: str = "cpu") -> None:
    import torch
    import transformers
    from transformers import pipeline

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pipe = pipeline("text-classification", model=path, tokenizer=path, device=device, function_to_apply="none")
    if device.startswith("cuda"):
        pipe.model.to(torch.bfloat16)
    MODEL["pipe"] = pipe


def _fasttext_job(files: list[str]) -> int:
    model = MODEL["ft"]
    n = 0
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            for text in pf.read_row_group(g, columns=["text"], use_threads=False).column(0).to_pylist():
                model.f.predict(" ".join(text.strip().splitlines()) + "\n", 1, 0.0, "strict")
                n += 1
    return n


def _pipeline_job(batch_size: int, files: list[str]) -> int:
    pipe = MODEL["pipe"]
    n = 0
    for path in files:
        texts = pq.read_table(path, columns=["text"], use_threads=False).column(0).to_pylist()
        n += len(pipe(texts, batch_size=batch_size, truncation=True, max_length=512))
    return n


def _embedding_job(files: list[str]) -> int:
    n = 0
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            col = pf.read_row_group(g, columns=["embedding"], use_threads=False).column(0).combine_chunks()
            n += len(np.asarray(col.flatten().to_numpy(), dtype=np.float32).reshape(-1, DIM))
    return n


def plain(job: Callable[..., int], files: list[Path], workers: int, *extra: object) -> float:
    """Seconds for `job` over the files split among `workers` forked processes."""
    import functools

    shares = [[str(p) for p in files[w::workers]] for w in range(workers)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(functools.partial(job, *extra) if extra else job, shares)
    return time.perf_counter() - t0


def race(label: str, docs: int, ours: Callable[[], float], theirs: Callable[[], float], rounds: int, goal: str) -> None:
    best_ours, best_theirs = float("inf"), float("inf")
    for r in range(rounds):  # interleaved, the order alternating: both see the same machine
        pair = [("ours", ours), ("theirs", theirs)] if r % 2 == 0 else [("theirs", theirs), ("ours", ours)]
        for who, fn in pair:
            s = fn()
            if who == "ours":
                best_ours = min(best_ours, s)
            else:
                best_theirs = min(best_theirs, s)
    a, b = docs / best_ours, docs / best_theirs
    print(f"{label:<10} armlab score {a:>10,.0f} docs/s   {goal.split(':')[0]:<34} {b:>10,.0f} docs/s   "
          f"ratio {a / b:.2f}x ({goal.split(':')[1].strip()})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--docs", type=int, default=None, help="documents in the pool (default 20,000; --quick 4,000)")
    ap.add_argument("--hf-docs", type=int, default=None, help="documents the hf lines score (default 2,000; --quick 600)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="also the hf scorer on a BERT-base-sized model on CUDA")
    ap.add_argument("--only", choices=["fasttext", "hf", "head"], action="append")
    args = ap.parse_args()
    n_docs = args.docs or (4000 if args.quick else 20000)
    n_hf = args.hf_docs or (600 if args.quick else 2000)
    rounds = args.rounds or (2 if args.quick else 3)
    only = set(args.only or ["fasttext", "hf", "head"])

    corpus = stdlib_documents()
    while len(corpus) < n_docs:
        corpus = corpus + corpus
    corpus = corpus[:n_docs]
    lengths = np.array([len(d) for d in corpus])
    print(
        f"pool: {n_docs:,} docs (Python's text files, chars per doc p10/p50/p90 "
        f"{np.percentile(lengths, 10):,.0f}/{np.percentile(lengths, 50):,.0f}/{np.percentile(lengths, 90):,.0f}), "
        f"{args.workers} workers, best of {rounds} rounds; measured on a shared machine: read the ratios"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["ARMLAB_CACHE"] = str(root / "cache")
        files = write_pool(root / "pool", corpus, files=4 * args.workers)
        good, junk = demo_documents(n_junk=400)
        train_fasttext(root / "quality.bin", good, junk)
        make_head(root / "head.safetensors", DIM)
        exp = experiment(root, "", args.batch_size)

        if "fasttext" in only:
            load_fasttext(str(root / "quality.bin"))
            race(
                "fasttext", n_docs, lambda: armlab_score(exp, "ft", args.workers),
                lambda: plain(_fasttext_job, files, args.workers),
                rounds, "fastText's own predict, same docs: goal >= 0.9x",
            )  # fmt: skip
        if "head" in only:
            race(
                "head", n_docs, lambda: armlab_score(exp, "head", args.workers),
                lambda: plain(_embedding_job, files, args.workers),
                rounds, "reading the embedding column alone: goal >= 0.8x",
            )  # fmt: skip
        if "hf" in only:
            hf_root = root / "hf"
            make_bert(hf_root / "bert", corpus[:2000], hidden=256, layers=4, max_position=512, vocab_size=8000)
            docs = web_mix(corpus, n_hf, hf_root / "bert")
            hf_files = write_pool(hf_root / "pool", docs, files=2 * args.workers, rows_per_group=256)
            shutil.copy(root / "quality.bin", hf_root / "quality.bin")
            shutil.copy(root / "head.safetensors", hf_root / "head.safetensors")
            hf_exp = experiment(hf_root, "", args.batch_size)
            import torch

            torch.set_num_threads(1)  # the forked workers inherit it: one core each, on both sides
            load_pipeline(str(hf_root / "bert"))
            race(
                "hf (cpu)", n_hf, lambda: armlab_score(hf_exp, "hf", args.workers),
                lambda: plain(_pipeline_job, hf_files, args.workers, args.batch_size),
                rounds, f"transformers pipeline, batch {args.batch_size}: goal >= 1.5x",
            )  # fmt: skip
        if args.gpu:
            gpu_bench(root, corpus, args)


def gpu_bench(root: Path, corpus: list[str], args: argparse.Namespace) -> None:
    """The hf scorer on a BERT-base-sized random model in bf16: docs/s per GPU (CUDA only). Here
    `armlab score` runs as the CLI (a GPU worker cannot be forked from a process that used CUDA),
    and the rate is its manifest's (executor start to end: the workers' imports and model load
    included)."""
    import json
    import subprocess

    from armlab.data.score.backends.hf import gpu_count

    gpus = gpu_count()
    if not gpus:
        print("gpu: skipped (no CUDA GPU here)")
        return
    n = len(corpus)
    g_root = root / "gpu"
    files = write_pool(g_root / "pool", corpus, files=4 * gpus, rows_per_group=1024)
    shutil.copy(root / "quality.bin", g_root / "quality.bin")
    shutil.copy(root / "head.safetensors", g_root / "head.safetensors")
    make_bert(g_root / "bert", corpus[:5000], hidden=768, layers=12, max_position=512, vocab_size=30000)
    exp = experiment(g_root, "", 256)
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "score", str(exp), "--scorer", "hf", "--device", "cuda"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"armlab score (cuda) failed:\n{r.stderr[-3000:]}")
    run = json.loads((g_root / "wd" / "scores" / "hf" / "manifest.json").read_text())["last_run"]
    print(f"gpu: armlab score, BERT-base-sized, bf16, batch 256: {run['docs_per_s'] / gpus:,.0f} docs/s per GPU ({gpus} GPUs, {n:,} docs)")
    load_pipeline(str(g_root / "bert"), "cuda:0")
    t0 = time.perf_counter()
    _pipeline_job(256, [str(p) for p in files])
    print(f"gpu: transformers pipeline, bf16, batch 256, one GPU (model loaded first): {n / (time.perf_counter() - t0):,.0f} docs/s")


if __name__ == "__main__":
    main()
