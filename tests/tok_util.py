"""Helpers for the tokenizer/loader/bpb tests: real text, real parquet shards, a real experiment."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.spec import Experiment, parse_experiment

MODULES = [
    "json",
    "os",
    "collections",
    "pathlib",
    "functools",
    "itertools",
    "textwrap",
    "argparse",
    "inspect",
]


def corpus(n: int | None = None, seed: int = 0) -> list[str]:
    """Real English/code text: stdlib docstrings, plus unicode and number-heavy documents."""
    docs: list[str] = []
    for name in MODULES:
        mod = __import__(name)
        docs.extend(inspect.getdoc(obj) or "" for _, obj in sorted(vars(mod).items()) if callable(obj))
    docs = [d for d in docs if len(d) > 20]
    rng = random.Random(seed)
    for i in range(40):  # varied scripts and digits, so the vocabulary sees more than ASCII
        docs.append(
            f"Row {i}: {rng.randint(0, 10**9)} ünïcödé café 東京 {'😀' * (i % 3)} total={i * 3.25:.2f}"
        )
    rng.shuffle(docs)
    return docs[:n] if n else docs


def write_shards(out: Path, texts: list[str], files: int, row_group_rows: int, manifest: bool = True) -> Path:
    """`files` shard files (texts split evenly, in order) with row groups of `row_group_rows` rows."""
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    entries = []
    for i in range(files):
        chunk = texts[i * per : (i + 1) * per]
        name = f"shard_{i:05d}.parquet"
        pq.write_table(
            pa.table({"text": chunk}), out / name, row_group_size=row_group_rows, compression="zstd"
        )
        entries.append({"name": name, "rows": len(chunk), "chars": sum(map(len, chunk))})
    if manifest:
        body = {
            "rows": len(texts),
            "chars": sum(map(len, texts)),
            "files": entries,
            "complete": True,
        }
        (out / "manifest.json").write_text(json.dumps(body))
    return out


def experiment(root: Path, name: str = "tok-test", vocab_size: int = 400, **tokenizer: object) -> Experiment:
    return parse_experiment(
        {
            "name": name,
            "workdir": str(root / "wd"),
            "pool": {"uri": str(root / "pool")},
            "tokenizer": {"vocab_size": vocab_size, "train_chars": 200_000, "doc_cap": 2_000, **tokenizer},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
            "model": {"depth": 2, "max_seq_len": 64},
        }
    )


def trained_tokenizer(root: Path, vocab_size: int = 400):
    """A real tokenizer trained by `train_experiment_tokenizer` on the stdlib corpus."""
    from armlab.tokenizer import train_experiment_tokenizer
    from armlab.workdir import open_workdir

    exp = experiment(root, vocab_size=vocab_size)
    write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(), files=2, row_group_rows=64)
    return train_experiment_tokenizer(exp)
