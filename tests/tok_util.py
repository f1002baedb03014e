"""Helpers for the tokenizer/loader/bpb tests: real text, real parquet shards, a real experiment."""

from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.data.identity import doc_keys, text_keys
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


def stdlib_docs(modules: list[str], min_chars: int) -> list[str]:
    """The docstrings (longer than `min_chars`) of the callables of stdlib modules, in a fixed order."""
    docs: list[str] = []
    for name in modules:
        mod = __import__(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > min_chars:
                docs.append(doc)
    return docs


def corpus(n: int | None = None, seed: int = 0) -> list[str]:
    """Real English/code text: stdlib docstrings, plus unicode and number-heavy documents."""
    docs = stdlib_docs(MODULES, min_chars=20)
    rng = random.Random(seed)
    for i in range(40):  # varied scripts and digits, so the vocabulary sees more than ASCII
        docs.append(
            f"Row {i}: {rng.randint(0, 10**9)} ünïcödé café 東京 {'😀' * (i % 3)} total={i * 3.25:.2f}"
        )
    rng.shuffle(docs)
    return docs[:n] if n else docs


def write_shards(
    out: Path,
    texts: list[str],
    files: int,
    row_group_rows: int,
    manifest: bool = True,
    with_keys: bool = False,
    **manifest_extra: object,
) -> Path:
    """`files` shard files (texts split evenly, in order) with row groups of `row_group_rows` rows;
    `with_keys` adds the eval set's `key` and `text_key` columns."""
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    entries = []
    for i in range(files):
        chunk = texts[i * per : (i + 1) * per]
        cols: dict[str, object] = {"text": chunk}
        if with_keys:
            cols["key"] = pa.array(doc_keys(None, pa.array(chunk)), pa.uint64())
            cols["text_key"] = pa.array(text_keys(chunk), pa.uint64())
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table(cols), out / name, row_group_size=row_group_rows, compression="zstd")
        entries.append({"name": name, "rows": len(chunk), "row_groups": -(-len(chunk) // row_group_rows),
                        "chars": sum(map(len, chunk)), "sha256": ""})  # fmt: skip
    if manifest:
        body = {"rows": len(texts), "chars": sum(map(len, texts)), "files": entries, "complete": True}
        (out / "manifest.json").write_text(json.dumps({**body, **manifest_extra}))
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
