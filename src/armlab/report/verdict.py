"""The one-line verdict per arm, the same in report.md/.html, summary.json and on the terminal.

    top16.5 beats random16.5 on CORE by +0.021 (95% CI +0.008 to +0.034, 3 seeds); val bpb
    within noise (-0.002, CI -0.006 to +0.002)

The headline metric is CORE when the runs have it, else val bpb; a metric "beats"/"loses to" only
when its 95% interval excludes 0, else it is "within noise". The parenthesis says how many seeds
stand behind it and, where it matters, that the interval is weak (< 3 seeds), unpaired (the arms
ran different seeds), seed-only (no per-item data to count eval noise) or item-only (one seed:
training noise not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from armlab.report.intervals import Interval

# metric -> (label, True when lower is better); the first present is the headline
METRICS = {"core": ("CORE", False), "val_bpb": ("val bpb", True)}


def digits(low: float | None, high: float | None) -> int:
    """Decimals that show the interval's half-width to two significant figures (3 to 5)."""
    if low is None or high is None or high <= low:
        return 4
    return min(5, max(3, 1 - math.floor(math.log10((high - low) / 2))))


def _num(x: float, d: int) -> str:
    return f"{x:+.{d}f}"


def seeds_note(iv: Interval, planned: str | None = None) -> str:
    """`3 seeds`, `3 vs 2 seeds, unpaired`, `2 of 3 planned seeds per arm finished, weak`, ..."""
    sa, sb = iv.seeds
    n = f"{sa} seed{'s' if sa != 1 else ''}" if sa == sb else f"{sa} vs {sb} seeds"
    notes = [planned or n]
    if not iv.paired and max(sa, sb) > 1:
        notes.append("unpaired")
    if iv.method == "items":
        notes.append("training noise not counted")
    elif min(sa, sb) < 3 and iv.low is not None:
        notes.append("weak")
    if iv.method == "seeds":
        notes.append("seed noise only")
    return ", ".join(notes)


def metric_phrase(
    metric: str, iv: Interval, arm: str, ref: str, headline: bool, planned: str | None = None
) -> str:
    label, lower_better = METRICS[metric]
    d = digits(iv.low, iv.high)
    est = _num(iv.estimate, d)
    if iv.low is None or iv.high is None:
        why = (
            "no spread between seeds, so no noise was measured"
            if iv.method == "none" and min(iv.seeds) >= 2
            else seeds_note(iv, planned)
        )
        body = f"{est}, no interval: {why}"
        return f"{arm} vs {ref} on {label}: {body}" if headline else f"{label} {body}"
    clip = ", clipped at the metric's range" if iv.clipped else ""
    ci = f"{f'{100 * iv.level:.4g}% CI' if headline else 'CI'} {_num(iv.low, d)} to {_num(iv.high, d)}{clip}"
    paren = (
        f"({ci}, {seeds_note(iv, planned)})"
        if headline
        else f"({ci}{'' if iv.method == 'seeds+items' else ', ' + iv.method + ' only'})"
    )
    if iv.low <= 0.0 <= iv.high:
        within = f"within noise ({est}, {paren[1:-1]})"
        return f"{arm} vs {ref}: {label} {within}" if headline else f"{label} {within}"
    better = (iv.estimate < 0) == lower_better
    if headline:
        verb = "beats" if better else "loses to"
        hint = ", lower is better" if lower_better else ""
        return f"{arm} {verb} {ref} on {label} by {est} {paren[:-1]}{hint})"
    return f"{label} {'better' if better else 'worse'} by {est} {paren}"


def verdict_line(arm: str, ref: str, comparisons: Mapping[str, Interval], planned: str | None = None) -> str:
    """One line for `arm` against `ref` from {metric: interval} (metrics in METRICS order);
    `planned` replaces the seed count when fewer seeds finished than were planned."""
    parts = []
    for metric in METRICS:
        if metric in comparisons:
            parts.append(metric_phrase(metric, comparisons[metric], arm, ref, not parts, planned))
    return "; ".join(parts)


def plus_minus(iv: Interval, d: int | None = None) -> str:
    """`-0.012 ± 0.004` (the estimate and the interval's half width)."""
    d = d or digits(iv.low, iv.high)
    if iv.half_width is None:
        return _num(iv.estimate, d)
    return f"{_num(iv.estimate, d)} ± {iv.half_width:.{d}f}"
