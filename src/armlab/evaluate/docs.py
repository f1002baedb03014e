"""The shared eval set as whole documents: their tokens, their bytes, their identity, a fixed sample.

Every evaluation of val bpb reads the eval set through here, so the final eval, the in-training
evals and the packed (nanochat-style) second number all see the same documents in the same order:
eval-set order, i.e. shard files by name, rows in file order.

- `eval_docs` tokenizes every document once per process (BOS first, as training sees them) and
  keeps each document's UTF-8 byte count, so coverage (scored bytes / eval-set bytes) is exact.
- `eval_set_fingerprint` is the eval set's content identity (the sha256 of every shard as its
  manifest records it), written into eval.json so `compare` can tell an evaluation of another eval
  set from one of this one.
- `sample_docs` is the fixed, seeded sample of whole documents the in-training evals score: the
  same documents for every run of the experiment (it depends on the eval set, the tokenizer,
  `eval.seed` and the token budget only), so the curves measure what the final verdict measures,
  on fewer documents.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from armlab.data.identity import mix
from armlab.errors import ArmlabError
from armlab.train.units import list_units

SAMPLE_SALT = 0x5A  # the sample's hash stream is its own (not the selection's or the loader's)


@dataclass(frozen=True)
class EvalDocs:
    """Every eval document's tokens (BOS first), concatenated, with offsets; and its bytes."""

    tokens: np.ndarray  # int32, all documents one after another
    offsets: np.ndarray  # int64 (n + 1,): document d is tokens[offsets[d]:offsets[d + 1]]
    text_bytes: np.ndarray  # int64 (n,): UTF-8 bytes of each document's text
    fingerprint: str  # eval_set_fingerprint of the dir they came from

    @property
    def n(self) -> int:
        return len(self.text_bytes)

    def doc(self, d: int) -> np.ndarray:
        return self.tokens[self.offsets[d] : self.offsets[d + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


_CACHE: dict[tuple[Any, ...], EvalDocs] = {}  # one eval set per process (a run evaluates one)


def eval_set_fingerprint(eval_dir: str | Path) -> str:
    """Content identity of an eval set: sha256 over (file name, file sha256) of its shards, from the
    manifest prepare wrote (files hashed here where it records none)."""
    eval_dir = Path(eval_dir)
    files, _ = list_units(eval_dir)
    try:
        listed = {
            f["name"]: f.get("sha256") for f in json.loads((eval_dir / "manifest.json").read_text())["files"]
        }
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    h = hashlib.sha256()
    for f in files:
        digest = listed.get(f.name)
        if not digest:
            from armlab.data.shards import sha256_file

            digest = sha256_file(f)
        h.update(f"{f.name}\0{digest}\n".encode())
    return h.hexdigest()[:16]


def read_texts(eval_dir: str | Path) -> list[str]:
    """The eval set's documents in eval-set order."""
    files, _ = list_units(eval_dir)
    texts: list[str] = []
    for f in files:
        column = pq.read_table(f, columns=["text"]).column("text")
        if column.null_count:
            raise ArmlabError(f"{f}: the eval set has null texts; rerun `armlab prepare EXP`")
        texts.extend(column.to_pylist())
    return texts


def eval_docs(eval_dir: str | Path, tokenizer: Any, batch: int = 1024) -> EvalDocs:
    """The eval set tokenized whole (cached per process, keyed by content and tokenizer)."""
    eval_dir = Path(eval_dir).resolve()
    fp = eval_set_fingerprint(eval_dir)
    key = (str(eval_dir), fp, tokenizer.fingerprint)
    if key not in _CACHE:
        _CACHE.clear()
        texts = read_texts(eval_dir)
        if not texts:
            raise ArmlabError(f"{eval_dir}: the eval set holds no documents; rerun `armlab prepare EXP`")
        docs: list[list[int]] = []
        for i in range(0, len(texts), batch):
            docs.extend(tokenizer.encode(texts[i : i + batch], prepend_bos=True))
        lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.concatenate([np.asarray(d, dtype=np.int32) for d in docs])
        nbytes = np.fromiter((len(t.encode("utf-8")) for t in texts), dtype=np.int64, count=len(texts))
        _CACHE[key] = EvalDocs(tokens, offsets, nbytes, fp)
    return _CACHE[key]


def sample_docs(docs: EvalDocs, max_tokens: int | None, seed: int) -> np.ndarray:
    """Indices (ascending) of the documents scored under a budget of `max_tokens` target tokens.

    None: every document. Otherwise documents are taken whole, in a seeded order that depends only
    on their position in the eval set and `seed` (SplitMix64, stable across versions), until their
    target tokens (all but BOS) reach the budget; the last one is taken whole too. A larger budget
    takes a superset of a smaller one's documents.
    """
    if max_tokens is None:
        return np.arange(docs.n, dtype=np.int64)
    if max_tokens < 1:
        raise ArmlabError(
            f"eval: max_tokens must be >= 1, got {max_tokens} (train.eval_tokens / --max-tokens)"
        )
    order = np.argsort(mix(np.arange(docs.n, dtype=np.uint64), seed, salt=SAMPLE_SALT), kind="stable")
    targets = np.cumsum(docs.lengths[order] - 1)
    take = int(np.searchsorted(targets, max_tokens)) + 1  # the first prefix that reaches the budget
    return np.sort(order[:take])
