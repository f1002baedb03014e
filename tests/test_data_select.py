"""Selection policies as pure functions: the radix threshold against a full sort, bit order, hashing."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import xxhash

from armlab.data.identity import doc_keys, text_keys
from armlab.data.select import cap_rank, float_bits, random_members, rank_threshold, top_rank


def test_float_bits_preserves_order() -> None:
    x = np.array([-np.inf, -3.5, -1e-300, -0.0, 0.0, 1e-300, 2.0, 7.25, np.inf])
    b = float_bits(x)
    assert (np.diff(b.astype(object)) >= 0).all()
    assert b[3] == b[4]  # -0.0 and 0.0 rank equal
    rng = np.random.default_rng(1)
    y = rng.normal(size=10_000) * 10.0 ** rng.integers(-5, 5, size=10_000)
    assert (np.argsort(y, kind="stable") == np.argsort(float_bits(y), kind="stable")).all()


def _chunks(p: np.ndarray, s: np.ndarray, w: np.ndarray | None, n_chunks: int):
    bounds = np.linspace(0, len(p), n_chunks + 1).astype(int)

    def gen():
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield p[a:b], s[a:b], (w[a:b] if w is not None else None)

    return gen


def _reference(p: np.ndarray, s: np.ndarray, w: np.ndarray | None, target: float) -> np.ndarray:
    order = np.lexsort((s, p))[::-1]
    cum = np.cumsum(np.ones(len(p)) if w is None else w[order])
    k = min(int(np.searchsorted(cum, target - 1e-9)), len(p) - 1)
    sel = np.zeros(len(p), dtype=bool)
    sel[order[: k + 1]] = True
    return sel


@pytest.mark.parametrize("collect_limit", [1, 50, 10**9])
@pytest.mark.parametrize("weighted", [False, True])
def test_rank_threshold_matches_full_sort(collect_limit: int, weighted: bool) -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    keys = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    scores = rng.integers(0, 6, size=n).astype(np.float64)  # few distinct values: ties everywhere
    p, s = top_rank(scores, keys, seed=3)
    w = rng.integers(1, 500, size=n).astype(np.float64) if weighted else None
    for target in (1, 777, 0.165 * (n if w is None else w.sum()), (n if w is None else w.sum())):
        th = rank_threshold(_chunks(p, s, w, 7), target, collect_limit=collect_limit)
        got = th.accepts(p, s)
        assert (got == _reference(p, s, w, target)).all()
        if w is None:
            assert got.sum() == round(target)


def test_rank_threshold_empty_target() -> None:
    p = np.arange(10, dtype=np.uint64)
    assert rank_threshold(_chunks(p, p, None, 2), 0) is None


def test_cap_rank_is_a_uniform_sample() -> None:
    keys = np.arange(100_000, dtype=np.uint64)
    p, s = cap_rank(keys, seed=5)
    th = rank_threshold(_chunks(p, s, None, 3), 30_000)
    sel = th.accepts(p, s)
    assert sel.sum() == 30_000
    # uniform over the key range: each tenth holds ~3,000
    counts = np.bincount(np.flatnonzero(sel) // 10_000, minlength=10)
    assert np.abs(counts - 3000).max() < 4 * np.sqrt(3000)


def test_random_members_binomial_and_seeded() -> None:
    keys = doc_keys(pa.array([f"id-{i}" for i in range(50_000)]), None)
    a = random_members(keys, seed=42, ratio=0.165)
    n, p = len(keys), 0.165
    assert abs(a.sum() - n * p) < 4 * np.sqrt(n * p * (1 - p))
    assert (a == random_members(keys, seed=42, ratio=0.165)).all()
    assert (a != random_members(keys, seed=43, ratio=0.165)).any()


def test_keys_are_xxh3_of_utf8_from_arrow_buffers() -> None:
    vals = ["a", "héllo wörld", None, "", "x" * 5000, "7"]
    ref = np.array([0 if v is None else xxhash.xxh3_64_intdigest(v.encode()) for v in vals], dtype=np.uint64)
    arr = pa.array(vals)
    assert (doc_keys(arr, None) == ref).all()
    assert (doc_keys(arr.slice(2), None) == ref[2:]).all()
    assert (doc_keys(pa.chunked_array([arr.slice(0, 3), arr.slice(3)]), None) == ref).all()
    assert (doc_keys(arr.cast(pa.large_string()), None) == ref).all()
    assert (doc_keys(pa.array([7]), None) == doc_keys(pa.array(["7"]), None)).all()
    assert (text_keys(["a", "7"]) == ref[[0, 5]]).all()
