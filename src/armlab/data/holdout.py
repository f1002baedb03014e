"""The shared eval holdout and the neutral tokenizer sample (DESIGN.md invariant 2).

Eval = the `[eval] docs` documents with the smallest `mix(key, eval.seed, SALT_EVAL)` over the
whole pool: an exact-size, uniform, deterministic draw that needs only the keys (a running set
of the `docs` smallest hashes, file by file; the cut is the docs-th smallest of those).
Every arm excludes these documents. The tokenizer sample is a seeded uniform fraction of the
non-eval documents sized to about `tokenizer.train_chars` characters.
"""

from __future__ import annotations

import numpy as np

from armlab.data.identity import mix, uniform
from armlab.data.select import SALT_EVAL, SALT_TOKENIZER
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


def tokenizer_fraction(spec: TokenizerSpec, non_eval_chars: float) -> float:
    return 1.0 if non_eval_chars <= 0 else min(1.0, spec.train_chars / non_eval_chars)


def tokenizer_mask(
    keys: np.ndarray, spec: TokenizerSpec, fraction: float, held_out: np.ndarray
) -> np.ndarray:
    return (uniform(keys, spec.seed, SALT_TOKENIZER) < fraction) & ~held_out
