"""Synthetic pools for tests (other areas may import these read-only).

`make_pool` writes real parquet (or jsonl) files shaped like fineweb-edu: an `id` column
(`<file>-<row>`), a `text` column of lorem-like words of varied length, a float `score`, an
integer `token_count` and a `source` column naming the file (for shuffle checks).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "been",
    "one",
    "all",
    "we",
    "their",
    "has",
    "would",
    "when",
    "if",
    "so",
    "no",
    "out",
    "up",
    "into",
    "do",
    "can",
    "more",
    "time",
    "school",
    "learn",
    "energy",
    "cell",
    "water",
    "history",
    "data",
    "model",
    "student",
    "teacher",
    "research",
    "light",
    "earth",
]


def make_texts(rng: np.random.Generator, n: int, mean_words: int = 60) -> list[str]:
    lengths = np.maximum(1, rng.geometric(1.0 / mean_words, size=n))
    words = np.array(WORDS)
    return [" ".join(words[rng.integers(0, len(words), size=k)]) for k in lengths]


def make_pool(
    directory: str | Path,
    n_docs: int,
    n_files: int,
    row_groups_per_file: int = 2,
    with_id: bool = True,
    with_score: bool = True,
    seed: int = 0,
    fmt: str = "parquet",
    empty_every: int = 0,
) -> list[Path]:
    """Write `n_docs` documents over `n_files` files; returns the file paths in order.

    `empty_every=k` makes every k-th text empty (and the next one null) to test dropping.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # The doc number at the end keeps texts unique, so tests can map shard rows back to the pool.
    texts: list[str | None] = [f"{t} #{i}" for i, t in enumerate(make_texts(rng, n_docs))]
    if empty_every:
        for i in range(0, n_docs, empty_every):
            texts[i] = ""
            if i + 1 < n_docs:
                texts[i + 1] = None
    scores = rng.normal(size=n_docs)
    bounds = np.linspace(0, n_docs, n_files + 1).astype(int)
    paths = []
    for f in range(n_files):
        lo, hi = bounds[f], bounds[f + 1]
        cols: dict[str, Any] = {}
        if with_id:
            cols["id"] = [f"doc-{i:08d}" for i in range(lo, hi)]
        cols["text"] = texts[lo:hi]
        if with_score:
            cols["score"] = scores[lo:hi]
        cols["token_count"] = [len(t or "") // 4 for t in texts[lo:hi]]
        cols["source"] = [f"file{f:03d}"] * (hi - lo)
        table = pa.table(cols)
        if fmt == "parquet":
            path = directory / f"part-{f:03d}.parquet"
            pq.write_table(table, path, row_group_size=max(1, -(-(hi - lo) // row_groups_per_file)))
        else:
            path = directory / f"part-{f:03d}.jsonl"
            with open(path, "w") as fh:
                for row in table.to_pylist():
                    fh.write(json.dumps(row) + "\n")
        paths.append(path)
    return paths


def pool_index(paths: list[Path]) -> dict[str, dict[str, Any]]:
    """text -> its pool row (id, score, token_count, source) for mapping shard rows back."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        for row in pq.read_table(p).to_pylist():
            if row["text"]:
                out[row["text"]] = row
    return out


DEFAULT_ARMS = """
[[arms]]
name = "rand"
kind = "random"
ratio = 0.3
seed = 42

[[arms]]
name = "top"
kind = "top"
ratio = 0.2
score_column = "score"
"""


def experiment_toml(
    workdir: Path, pool_uri: str, arms: str | None = None, eval_docs: int = 50, **extra: str
) -> str:
    """A small experiment file over a synthetic pool: random + top arms by default."""
    if arms is None:
        arms = DEFAULT_ARMS
    sections = "\n".join(f"[{k}]\n{v}\n" for k, v in extra.items())
    return f"""name = "datatest"
workdir = "{workdir}"

[pool]
uri = "{pool_uri}"
text_column = "text"
id_column = "id"
token_count_column = "token_count"

[eval]
docs = {eval_docs}
seed = 0

[tokenizer]
vocab_size = 512
train_chars = 200000

[shards]
rows_per_shard = 300
row_group_rows = 64
{sections}
{arms}
[model]
depth = 2
max_seq_len = 64
"""


def dir_shas(d: Path) -> dict[str, str]:
    """File name -> sha256 of every file in a dir (shards and manifest)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def all_shas(wd: Path) -> dict[str, dict[str, str]]:
    """`dir_shas` of every dir prepare writes in workdir `wd`: eval, tokenizer sample, each arm."""
    dirs = {"eval": wd / "eval", "tokenizer": wd / "tokenizer" / "sample"}
    dirs.update({p.parent.name: p for p in sorted((wd / "arms").glob("*/data"))})
    return {k: dir_shas(v) for k, v in dirs.items()}
