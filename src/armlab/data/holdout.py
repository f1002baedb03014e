"""The shared eval holdout and the neutral tokenizer sample (DESIGN.md invariant 2).

Eval = the `[eval] docs` documents with the smallest `mix(key, eval.seed, SALT_EVAL)` over the
whole pool: an exact-size, uniform, deterministic draw that needs only the keys (a running set
of the `docs` smallest hashes, file by file; the cut is the docs-th smallest of those).
Every arm excludes these documents.

The tokenizer sample is counted in documents, not bytes: the first documents of a seeded
uniform order of the non-eval pool (ascending `mix(key, tokenizer.seed, SALT_TOKENIZER)`) whose
characters, each document capped at `tokenizer.doc_cap` as the tokenizer reads them, reach
`tokenizer.train_chars`. One 50 MB document then counts as doc_cap characters, not 50 M, and
cannot shrink the sample. The cut is a threshold on that order (`tokenizer_rank`) found by
`select.rank_threshold` over the documents' capped lengths; where the key pass did not read the
texts, their lengths are estimated (token counts, else each file's mean) and the sample is
staged with a margin, then cut exactly when its shards are written.
"""

from __future__ import annotations

import numpy as np

from armlab.data.identity import mix
from armlab.data.select import SALT_EVAL, SALT_TOKENIZER, Threshold
from armlab.errors import ArmlabError
from armlab.spec import EvalSpec, TokenizerSpec


def eval_hashes(keys: np.ndarray, spec: EvalSpec) -> np.ndarray:
    return mix(keys, spec.seed, SALT_EVAL)


def smallest(hashes: np.ndarray, k: int) -> np.ndarray:
    """The k smallest values (unsorted), all of them when there are fewer."""
    if len(hashes) <= k:
        return hashes
    return np.partition(hashes, k - 1)[:k]


def eval_cut(smallest_hashes: np.ndarray, spec: EvalSpec, pool_rows: int, uri: str) -> int:
    """The docs-th smallest eval hash: a document is held out when its hash is <= the cut."""
    if pool_rows <= spec.docs:
        raise ArmlabError(
            f"pool {uri!r} has {pool_rows:,} documents, but [eval] docs = {spec.docs:,} would leave none for the arms; "
            "lower eval.docs"
        )
    return int(np.partition(smallest_hashes, spec.docs - 1)[spec.docs - 1])


def eval_mask(keys: np.ndarray, spec: EvalSpec, cut: int) -> np.ndarray:
    return eval_hashes(keys, spec) <= np.uint64(cut)


def tokenizer_order(keys: np.ndarray, spec: TokenizerSpec) -> np.ndarray:
    """The sample's order: ascending, so its shards are written in it (a uniform permutation)."""
    return mix(keys, spec.seed, SALT_TOKENIZER)


def tokenizer_rank(keys: np.ndarray, spec: TokenizerSpec) -> tuple[np.ndarray, np.ndarray]:
    """(primary, secondary) ranks for `select.rank_threshold`: larger is earlier in the order."""
    return ~tokenizer_order(keys, spec), np.zeros(len(keys), dtype=np.uint64)


def tokenizer_mask(
    keys: np.ndarray, spec: TokenizerSpec, cut: Threshold | None, held_out: np.ndarray
) -> np.ndarray:
    if cut is None:
        return np.zeros(len(keys), dtype=bool)
    return cut.accepts(*tokenizer_rank(keys, spec)) & ~held_out
