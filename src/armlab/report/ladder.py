"""The ladder: the same arms at several depths (`[ladder] depths`), each depth its own comparable
set of runs, and whether the ranking holds from the smallest model to the one the experiment is
about (`model.depth`, the target).

This is DataDecide's question asked of the user's own data (Magnusson et al. 2025, "DataDecide:
How to Predict Best Pretraining Data with Small Experiments"): across 25 corpora and 14 sizes, the
ranking at one small size picked the 1B winner in about 80% of pairs, and no scaling-law
extrapolation beat that compute-decision frontier. Here each rung is compared as any experiment
is (`compare.analyse`: seed + eval-item intervals, paired by seed); the ladder then says, per arm
and metric, at which depths the arm beats / loses to the reference / is within noise, whether a
decided ranking flips between depths, and the smallest depth whose decision agrees with the
target's (and the share of the target's compute a run there costs).
"""

from __future__ import annotations

from armlab.budget import training_budget
from armlab.report.intervals import Interval
from armlab.report.summary import Ladder, Rung, Summary
from armlab.report.verdict import METRICS, plus_minus
from armlab.spec import Experiment


def sign(iv: Interval | None) -> int:
    """+1 / -1 when the interval excludes 0 on that side, 0 when it holds it (or there is none)."""
    if iv is None or iv.low is None or iv.high is None or iv.low <= 0 <= iv.high:
        return 0
    return 1 if iv.estimate > 0 else -1


def rung_record(rung: Experiment, summary: Summary | None, missing: str | None) -> Rung:
    b = training_budget(rung)
    arms: dict[str, dict[str, Interval]] = {}
    diffs: dict[str, dict[str, Interval]] = {}
    seeds: dict[str, int] = {}
    if summary is not None:
        for m in METRICS:
            arms[m] = {a: e.interval(m) for a, e in summary.arms.items() if e.interval(m) is not None}
            diffs[m] = {c.arm: c.interval for c in summary.comparisons if c.metric == m}
        seeds = {a: len(e.runs) for a, e in summary.arms.items()}
    return Rung(
        depth=rung.model.depth,
        params=b.params.scaling,
        tokens=b.tokens,
        flops=float(b.flops_per_token) * b.tokens,
        arms={m: v for m, v in arms.items() if v},
        differences={m: v for m, v in diffs.items() if v},
        seeds=seeds,
        missing=missing,
    )


def ladder_verdict(arm: str, reference: str, metric: str, rungs: list[Rung], target: int) -> str | None:
    """`top vs random, val bpb by depth: d2 better (-0.03 ± 0.01), d4 within noise, d6 better (...)
    (target): the ranking holds from d2 (3% of the target's compute a run)`."""
    label, lower_better = METRICS[metric]
    have = [r for r in rungs if arm in r.differences.get(metric, {})]
    if not have:
        return None
    words = {1: "worse", -1: "better"} if lower_better else {1: "better", -1: "worse"}
    parts = []
    for r in have:
        iv = r.differences[metric][arm]
        s = sign(iv)
        word = words[s] if s else "within noise"
        parts.append(f"d{r.depth} {word} ({plus_minus(iv)}){' (target)' if r.depth == target else ''}")
    decided = {sign(r.differences[metric][arm]) for r in have} - {0}
    top = next((r for r in have if r.depth == target), None)
    want = sign(top.differences[metric][arm]) if top else 0
    if len(decided) > 1:
        flip = [r.depth for r in have if sign(r.differences[metric][arm])]
        tail = f"the ranking FLIPS between depths ({', '.join(f'd{d}' for d in flip)} disagree)"
    elif top is None:
        tail = f"no result at the target depth d{target} yet"
    elif want == 0:
        tail = f"undecided at the target depth d{target}"
    else:
        agree = [r for r in have if sign(r.differences[metric][arm]) == want]
        first = agree[0]
        share = first.flops / top.flops if top.flops else 0.0
        tail = (
            f"the ranking holds; the smallest depth that already decides as the target does is d{first.depth} "
            f"({share:.1%} of a target run's compute)"
        )
    return f"{arm} vs {reference}, {label} by depth: {', '.join(parts)}: {tail}"


def ladder(exp: Experiment, compared: dict[int, Summary | str]) -> Ladder:
    """The ladder from each depth's comparison (`compared`: depth -> its summary, or why there is
    none: `compare` makes them, each rung on its own)."""
    rungs = [
        rung_record(r, c if isinstance(c, Summary) else None, c if isinstance(c, str) else None)
        for r in exp.rungs()
        for c in [compared.get(r.model.depth, "not compared")]
    ]
    reference = next((c.reference_arm for c in compared.values() if isinstance(c, Summary)), exp.arms[0].name)
    verdict = [
        line
        for metric in METRICS
        for a in exp.arms
        if a.name != reference and (line := ladder_verdict(a.name, reference, metric, rungs, exp.model.depth))
    ]
    return Ladder(reference=reference, target=exp.model.depth, rungs=rungs, verdict=verdict)
