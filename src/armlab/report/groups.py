"""Val bpb per group of eval documents: where each arm wins and where it loses.

One pooled val bpb can hide two effects that cancel: in one 6-seed experiment the top arm was
better on good documents in every seed and worse on junk, and the pooled number said "within
noise". With `[report] group_column`, prepare writes each eval document's group beside it (the
eval shards' `group:<column>` / `score:<column>` labels, `data/prepare/targets.eval_labels`), and
the per-document nats and bytes in every run's eval.json are summed per group.

Groups are the column's values (the `max_groups` - 1 largest by eval documents, the rest pooled as
"other"), or, with `group_bins`, quantile bins of a numeric column over the eval documents.
Each group's interval is made exactly as the pooled one (`intervals`: seed noise from the
per-seed group values, paired by seed; the documents' own noise from a paired bootstrap over the
group's documents), at level 1 - 0.05 / K for K groups (Bonferroni), so that all K claims of the
verdict line hold together at 95%: with 8 groups and plain 95% intervals, one group in three
experiments would "win" by chance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from armlab.report.intervals import (
    RESAMPLES,
    SEED,
    ItemScores,
    Stratum,
    arm_interval,
    difference_interval,
    replicates,
)
from armlab.report.summary import GroupResult, Groups
from armlab.report.verdict import plus_minus
from armlab.spec import Experiment
from armlab.workdir import open_workdir

MIN_DOCS = 5  # a group with fewer eval documents is pooled into "other"
OTHER = "other"
NO_VALUE = "(none)"


@dataclass(frozen=True)
class Labels:
    """Each eval document's group, in eval-set order (the order of eval.json's per-document sums)."""

    column: str
    binned: bool
    names: list[str]  # group names, largest first ("other" last)
    index: np.ndarray  # (docs,) index into names


def read_labels(exp: Experiment) -> Labels | str:
    """The eval documents' groups, or why there are none (a line for the report)."""
    spec = exp.report
    label = spec.group_label([x.name for x in getattr(exp, "scorers", [])])
    if label is None:
        return "no report.group_column"
    eval_dir = open_workdir(exp, create=False).eval_dir
    files = sorted(eval_dir.glob("shard_*.parquet"))  # the eval set's order (train/units.list_units)
    if not files:
        return f"the eval set is not on this machine ({eval_dir})"
    if any(label not in pq.read_schema(f).names for f in files):
        return (
            f"the eval set in {eval_dir} carries no {label!r} labels (prepared before report.group_column was "
            "set): rerun `armlab prepare EXP` to add them (the same documents: no run needs a new evaluation)"
        )
    col = [pq.read_table(f, columns=[label]).column(label).to_pylist() for f in files]
    values = [v for part in col for v in part]
    if spec.group_bins:
        return _bins(spec.group_column, np.array([np.nan if v is None else v for v in values], float), spec.group_bins)
    return _categories(spec.group_column, [NO_VALUE if v is None else str(v) for v in values], spec.max_groups)


def _categories(column: str, values: list[str], max_groups: int) -> Labels:
    names, counts = np.unique(np.array(values, dtype=object), return_counts=True)
    order = [str(names[i]) for i in np.argsort(-counts, kind="stable")]
    size = dict(zip(map(str, names), counts.tolist(), strict=True))
    keep = [n for n in order if size[n] >= MIN_DOCS][: max_groups - 1 if len(order) > max_groups else max_groups]
    if len(keep) < len(order):
        keep.append(OTHER)
    pos = {n: i for i, n in enumerate(keep)}
    other = pos.get(OTHER, -1)
    return Labels(column, False, keep, np.array([pos.get(v, other) for v in values]))


def _bins(column: str, x: np.ndarray, bins: int) -> Labels:
    """Quantile bins over the documents that have a value; documents without one apart."""
    has = ~np.isnan(x)
    edges = np.unique(np.quantile(x[has], np.linspace(0, 1, bins + 1))) if has.any() else np.array([0.0])
    inner = edges[1:-1]
    idx = np.searchsorted(inner, x, side="right")  # bin k: [edges[k], edges[k+1]), the last closed
    names = [f"{column} {_num(edges[k])}-{_num(edges[k + 1])}" for k in range(len(edges) - 1)] or [column]
    if (~has).any():
        names.append(f"{column} {NO_VALUE}")
        idx = np.where(has, idx, len(names) - 1)
    return Labels(column, True, names, idx)


def _num(v: float) -> str:
    return f"{v:.3g}"


def _subset(scores: ItemScores, mask: np.ndarray) -> ItemScores:
    (st,) = scores.strata  # val bpb: one stratum, the eval set
    den = st.den[..., mask]
    return ItemScores(scores.seeds, (Stratum(st.label, st.num[:, mask], den, st.scale, st.offset),), scores.weight)


def group_results(
    labels: Labels, scores: dict[str, ItemScores], reference: str, resamples: int = RESAMPLES
) -> Groups | str:
    """Per group: each arm's val bpb and each arm's difference from `reference`, with intervals
    at the Bonferroni level; or why not (a line)."""
    first = next(iter(scores.values()))
    n = first.strata[0].items
    if n != len(labels.index):
        return f"eval.json scores {n:,} documents but the eval set holds {len(labels.index):,}; rerun `armlab evaluate EXP --force`"
    den = first.strata[0].den
    doc_bytes = den if den.ndim == 1 else den.mean(0)
    total = float(doc_bytes.sum()) or 1.0
    present = [k for k in range(len(labels.names)) if doc_bytes[labels.index == k].sum() > 0]
    level = 1 - 0.05 / max(1, len(present))
    out = []
    for k in present:
        mask = labels.index == k
        sub = {a: _subset(s, mask) for a, s in scores.items()}
        reps = dict(zip(sub, replicates(list(sub.values()), resamples, SEED), strict=True))
        values = {a: dict(zip(s.seeds, s.values().tolist(), strict=True)) for a, s in sub.items()}
        items = [int(mask.sum())]
        arms = {a: arm_interval(np.array(list(values[a].values())), reps[a], items, (0.0, math.inf), level) for a in sub}
        diffs = {
            a: difference_interval(values[a], values[reference], reps[a], reps[reference], items, level=level)
            for a in sub
            if a != reference
        }
        out.append(GroupResult(label=labels.names[k], docs=items[0], byte_share=float(doc_bytes[mask].sum()) / total,
                               arms=arms, differences=diffs))  # fmt: skip
    verdict = [group_verdict(a, reference, labels.column, out) for a in scores if a != reference]
    return Groups(column=labels.column, binned=labels.binned, level=level, groups=out, verdict=verdict)


def group_verdict(arm: str, reference: str, column: str, groups: list[GroupResult]) -> str:
    """`top vs random by source (val bpb): better on prose (-0.012 ± 0.004), worse on word salad
    (+0.030 ± 0.010); within noise on spam` (lower bpb is better)."""
    better, worse, noise = [], [], []
    for g in sorted(groups, key=lambda g: g.differences[arm].estimate):
        iv = g.differences[arm]
        if iv.low is None or iv.high is None or iv.low <= 0 <= iv.high:
            noise.append(g.label)
        else:
            (better if iv.estimate < 0 else worse).append(f"{g.label} ({plus_minus(iv)})")
    parts = []
    if better:
        parts.append(f"better on {', '.join(better)}")
    if worse:
        parts.append(f"worse on {', '.join(worse)}")
    head = f"{arm} vs {reference} by {column} (val bpb per group)"
    if not parts:
        return f"{head}: within noise in every group ({len(groups)})"
    tail = f"; within noise on {', '.join(noise)}" if noise else ""
    return f"{head}: {', '.join(parts)}{tail}"
