"""Arm data statistics, counted in the passes prepare makes anyway (the report's "what differs in
the data" section reads them from each arm's manifest).

Per arm, over the documents written to its shards: a histogram of document lengths in chars
(fixed log-spaced edges, the same for every arm of every experiment), a histogram of the pool's
score (edges over the pool's score range, the same for every arm of the pass; documents without
a score counted apart) and of every scorer's score (`armlab score`), counts per value of `[report] group_column` (read in the key pass), and
how many documents it shares with each other arm prepared in the same pass. Counting reads
only arrays the text pass already holds, so the shards' bytes do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from armlab.data import holdout
from armlab.data.prepare.keys import load_keys
from armlab.data.select import Rules

# 1, 10^0.25, ... 10^7 chars, rounded: a document shorter than 1 char or longer than 10 M chars
# is counted in the first or last bin.
DOC_CHARS_EDGES = [int(x) for x in np.unique(np.round(np.logspace(0, 7, 29)))]
SCORE_BINS = 32
NULL_GROUP = "(null)"


@dataclass(frozen=True)
class StatsSpec:
    """What to count (picklable, for the workers)."""

    score_column: str | None  # the pool's score column (the first arm's that has one)
    score_edges: list[float] | None
    group_column: str | None  # `[report] group_column`
    arms: tuple[str, ...]  # the arms of this pass (the others are the eval set and tokenizer sample)
    scorers: dict[str, list[float]] = field(default_factory=dict)  # scorer -> its score's edges


def score_edges(
    column: str | None, rules: Rules, live: list[int], npz: dict[int, Path], key: str | None = None
) -> list[float] | None:
    """SCORE_BINS equal bins over the non-eval pool's score range; None without scores. `key`:
    another key-pass array than the column's (a scorer's, `scorer:<name>`)."""
    if column is None and key is None:
        return None
    key = key or f"score:{column}"
    lo, hi = np.inf, -np.inf
    for i in live:
        a = load_keys(npz[i])
        sc = a[key][~holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)]
        sc = sc[~np.isnan(sc)]
        if sc.size:
            lo, hi = min(lo, float(sc.min())), max(hi, float(sc.max()))
    if lo > hi:
        return None
    return [float(x) for x in np.linspace(lo, hi if hi > lo else lo + 1.0, SCORE_BINS + 1)]


def _hist(x: np.ndarray, edges: list[float]) -> list[int]:
    """Counts per bin; values beyond the edges go to the first / last bin."""
    e = np.asarray(edges, dtype=np.float64)
    idx = np.clip(np.searchsorted(e, x, side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1).astype(int).tolist()


def unit_stats(
    spec: StatsSpec, name: str, kept: dict[str, np.ndarray], doc_chars: np.ndarray, a: dict[str, np.ndarray]
) -> dict[str, Any]:
    """One unit's counts for target `name`: `kept[t]` are the rows each target wrote."""
    m = kept[name]
    out: dict[str, Any] = {"doc_chars": _hist(doc_chars[m], DOC_CHARS_EDGES)}
    if spec.score_column and spec.score_edges and f"score:{spec.score_column}" in a:
        sc = a[f"score:{spec.score_column}"][m]
        nan = np.isnan(sc)
        out["score"] = _hist(sc[~nan], spec.score_edges)
        out["score_nan"] = int(nan.sum())
    for name, edges in spec.scorers.items():
        if f"scorer:{name}" in a:
            sc = a[f"scorer:{name}"][m]
            nan = np.isnan(sc)
            out[f"scorer:{name}"] = _hist(sc[~nan], edges)
            out[f"scorer_nan:{name}"] = int(nan.sum())
    if spec.group_column and "group" in a:
        values = [str(v) for v in a["group_values"]]
        codes = a["group"][m]
        counts = np.bincount(codes[codes >= 0], minlength=len(values))
        out["group"] = {values[j]: int(c) for j, c in enumerate(counts) if c}
        if (codes < 0).any():
            out["group"][NULL_GROUP] = int((codes < 0).sum())
    if name in spec.arms:
        out["overlap"] = {o: int((m & kept[o]).sum()) for o in spec.arms if o != name and o in kept}
    return out


def add(total: dict[str, Any] | None, part: dict[str, Any]) -> dict[str, Any]:
    """Sum two units' counts (lists bin by bin, dicts key by key, numbers)."""
    if total is None:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in part.items()}
    for k, v in part.items():
        if isinstance(v, list):
            total[k] = [x + y for x, y in zip(total.get(k, [0] * len(v)), v, strict=True)]
        elif isinstance(v, dict):
            d = total.setdefault(k, {})
            for kk, vv in v.items():
                d[kk] = d.get(kk, 0) + vv
        else:
            total[k] = total.get(k, 0) + v
    return total


def manifest_stats(spec: StatsSpec | None, counts: dict[str, Any] | None) -> dict[str, Any]:
    """`manifest["stats"]` (the schema the report reads) from a target's summed counts."""
    counts = counts or {}
    score = None
    if spec is not None and spec.score_column and spec.score_edges and "score" in counts:
        score = {
            "column": spec.score_column,
            "edges": spec.score_edges,
            "counts": counts["score"],
            "nan": counts.get("score_nan", 0),
        }
    group = None
    if spec is not None and spec.group_column and "group" in counts:
        group = {"column": spec.group_column, "counts": dict(sorted(counts["group"].items()))}
    return {
        "doc_chars": {
            "edges": DOC_CHARS_EDGES,
            "counts": counts.get("doc_chars", [0] * (len(DOC_CHARS_EDGES) - 1)),
        },
        "score": score,
        "scorers": {
            name: {"edges": edges, "counts": counts[f"scorer:{name}"], "nan": counts.get(f"scorer_nan:{name}", 0)}
            for name, edges in (spec.scorers if spec is not None else {}).items()
            if f"scorer:{name}" in counts
        },
        "group": group,
        "overlap": dict(sorted(counts.get("overlap", {}).items())),
    }
