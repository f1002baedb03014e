"""Continuous CORE beside accuracy-CORE, and each task's signal-to-noise measured from the runs.

Three CORE metrics, each per task and aggregated (mean over tasks), each with the item+seed
intervals of `intervals` (per-item data from eval.json, `scores`):

    core         accuracy, centred by the task's random baseline (nanochat's CORE)
    core_lp      log-prob of the correct continuation, bits per byte (<= 0, higher is better)
    core_margin  bits per byte of the correct option minus the best wrong one (choice tasks)

Why: at small scale accuracy is mostly noise; likelihood-based scores rank data recipes far
more reliably (DataDecide, Magnusson et al. 2025: continuous likelihood metrics predict the
larger-scale winner better than accuracy; Signal and Noise, Heineman et al. 2025).

Signal-to-noise per task and metric, after Signal and Noise (Heineman et al. 2025, their
`signal_to_noise_ratio`): signal = the dispersion of the arms' scores, max over pairs of arms of
|m_a - m_b| (m = the arm's final score, mean over seeds); noise = the standard deviation of a
run's score over its last k checkpoints (`[evaluate] last_k`), averaged over every run of every
arm; SNR = signal / noise. The paper divides both by the mean score (relative dispersion over
relative standard deviation); the two means are of the same task's scores and nearly cancel, and a
centred accuracy near 0 (usual at small scale) or a negative log-prob would make the relative forms
meaningless, so armlab uses the ratio of the absolute quantities. A task whose SNR is below
`[evaluate] min_snr` is flagged, and each aggregate is shown again without its flagged tasks (the
paper's "filter noisy subtasks" intervention). Noise needs k >= 2 checkpoints per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np

from armlab.evaluate.record import EvalResult
from armlab.report.intervals import RESAMPLES, SEED, ItemScores, arm_interval, difference_interval, replicates
from armlab.report.scores import continuous_scores, core_scores
from armlab.runs import RunRecord
from armlab.spec import Experiment

# metric -> (label, the per-checkpoint field of a task, of the aggregate, higher is better)
CORE_METRICS = {
    "core": ("CORE accuracy (centred)", "centered", "core"),
    "core_lp": ("CORE log-prob (bits/byte)", "lp", "core_lp"),
    "core_margin": ("CORE margin (bits/byte)", "margin", "core_margin"),
}


@dataclass(frozen=True)
class Snr:
    """Signal, noise and their ratio for one task (or aggregate) and metric."""

    signal: float
    noise: float | None  # None: fewer than 2 checkpoints per run
    snr: float | None  # None: noise unknown (k < 2) or zero
    checkpoints: int  # per run (the least over runs)

    def as_dict(self) -> dict[str, Any]:
        return {"signal": self.signal, "noise": self.noise, "snr": self.snr, "checkpoints": self.checkpoints}


def snr(arm_means: Sequence[float], run_series: Sequence[Sequence[float]]) -> Snr:
    """Signal and Noise's ratio (see the module docstring): `arm_means` one per arm, `run_series` the
    score over the last k checkpoints of each run."""
    signal = max((abs(a - b) for a, b in combinations(arm_means, 2)), default=0.0)
    k = min((len(s) for s in run_series), default=0)
    if k < 2:
        return Snr(signal, None, None, k)
    # np.std: ddof 0, as the paper's code; a spread at float rounding level is no noise
    stds = [
        float(np.std(s)) if np.ptp(s) > 1e-12 * max(1.0, float(np.abs(s).max())) else 0.0 for s in run_series
    ]
    noise = float(np.mean(stds))
    ratio = signal / noise if noise > 0 else None  # no noise measured: no ratio (JSON has no inf)
    return Snr(signal, noise, ratio, k)


def _series(runs: Sequence[RunRecord], metric: str, label: str | None) -> list[list[float]]:
    """Per run: the task's (or, label None, the aggregate's) score at each of its last k checkpoints."""
    _, field, total = CORE_METRICS[metric]
    out = []
    for r in runs:
        cps = EvalResult.from_json(r.eval or {}, r.run).checkpoints
        vals = [c.tasks.get(label, {}).get(field) if label else getattr(c, total) for c in cps]
        out.append([float(v) for v in vals if v is not None])
    return out


def _subset(s: ItemScores, keep: list[int]) -> ItemScores:
    return ItemScores(s.seeds, tuple(s.strata[k] for k in keep), 1 / len(keep))


def _bounds(metric: str, scores: ItemScores, diff: bool) -> tuple[float, float]:
    if metric != "core":
        return (-math.inf, 0.0 if not diff and metric == "core_lp" else math.inf)
    lo = float(np.mean([st.offset for st in scores.strata]))
    return (lo - 1.0, 1.0 - lo) if diff else (lo, 1.0)


def _intervals(
    scores: dict[str, ItemScores], ref: str, metric: str, keep: list[int] | None = None
) -> dict[str, Any]:
    """Per arm the aggregate over the kept tasks (all: None) with its interval, and each arm's
    difference from `ref`."""
    arms = list(scores)
    sub = {a: scores[a] if keep is None else _subset(scores[a], keep) for a in arms}
    reps = replicates([sub[a] for a in arms], RESAMPLES, SEED)
    reps = {a: r * sub[a].weight for a, r in zip(arms, reps, strict=True)}
    items = [st.items for st in sub[arms[0]].strata]
    values = {a: dict(zip(sub[a].seeds, sub[a].values(), strict=True)) for a in arms}
    out: dict[str, Any] = {"arms": {}, "differences": {}}
    for a in arms:
        out["arms"][a] = arm_interval(
            np.array(list(values[a].values())), reps[a], items, _bounds(metric, sub[a], False)
        ).as_dict()
        if a != ref:
            out["differences"][a] = difference_interval(
                values[a], values[ref], reps[a], reps[ref], items, _bounds(metric, sub[a], True)
            ).as_dict()
    return out


def continuous_summary(exp: Experiment, runs: dict[str, list[RunRecord]], ref: str) -> dict[str, Any] | None:
    """summary["continuous"]: per CORE metric, per-task scores, SNR and flags, and the aggregates
    (all tasks, and without the flagged ones) with intervals; None when the runs have no CORE."""
    if not all(EvalResult.from_json(rs[0].eval or {}, rs[0].run).core for rs in runs.values()):
        return None
    min_snr = exp.evaluate.min_snr
    out: dict[str, Any] = {"min_snr": min_snr, "reference_arm": ref, "metrics": {}, "missing": {}}
    for metric, (label, _, _) in CORE_METRICS.items():
        got = {a: (core_scores(rs) if metric == "core" else continuous_scores(rs, metric.removeprefix("core_")))
               for a, rs in runs.items()}  # fmt: skip
        lacking = [f"{a}: {sc.missing}" for a, sc in got.items() if sc.scores is None]
        if lacking:
            out["missing"][metric] = "; ".join(lacking)
            continue
        scores = {a: sc.scores for a, sc in got.items() if sc.scores is not None}
        tasks = [st.label for st in next(iter(scores.values())).strata]
        per_task = {}
        for k, task in enumerate(tasks):
            means = {a: float(s.stratum_values()[:, k].mean()) for a, s in scores.items()}
            ratio = snr(list(means.values()), [x for rs in runs.values() for x in _series(rs, metric, task)])
            per_task[task] = {
                "arms": means,
                **ratio.as_dict(),
                "flagged": ratio.snr is not None and ratio.snr < min_snr,
            }
        agg_means = [float(s.values().mean()) for s in scores.values()]
        aggregate = snr(agg_means, [x for rs in runs.values() for x in _series(rs, metric, None)])
        keep = [k for k, t in enumerate(tasks) if not per_task[t]["flagged"]]
        entry = {
            "label": label,
            "tasks": per_task,
            "snr": aggregate.as_dict(),
            "all": _intervals(scores, ref, metric),
            "kept_tasks": [tasks[k] for k in keep],
            "without_flagged": _intervals(scores, ref, metric, keep)
            if keep and len(keep) < len(tasks)
            else None,
        }
        out["metrics"][metric] = entry
    return out


# -- the report's table -----------------------------------------------------------------------------
def _num(x: float | None, d: int = 4, sign: str = "") -> str:
    return "-" if x is None else f"{x:{sign}.{d}f}"


def _snr(x: float | None, noise: float | None) -> str:
    if x is None:
        return "no noise" if noise == 0 else "-"
    return f"{x:.1f}"


def _iv(iv: dict[str, Any] | None, sign: str = "") -> str:
    if not iv:
        return "-"
    if iv["low"] is None:
        return _num(iv["estimate"], sign=sign)
    return f"{_num(iv['estimate'], sign=sign)} [{_num(iv['low'], sign=sign)}, {_num(iv['high'], sign=sign)}]"


def table(cont: dict[str, Any]) -> tuple[list[str], list[str], list[list[str]]]:
    """(lines, header, rows) of the report's "Continuous CORE and signal-to-noise" section."""
    ref = cont["reference_arm"]
    metrics = cont["metrics"]
    if not metrics:
        return [f"no per-item CORE scores: {'; '.join(cont['missing'].values())}"], [], []
    first = next(iter(metrics.values()))
    arms = list(first["all"]["arms"])
    others = [a for a in arms if a != ref]
    header = ["task", "metric", *arms, *(f"{a} - {ref}" for a in others), "signal", "noise", "SNR"]
    rows: list[list[str]] = []
    for m in metrics.values():
        for task, t in m["tasks"].items():
            flag = " (low SNR)" if t["flagged"] else ""
            rows.append([
                task, m["label"], *(_num(t["arms"][a]) for a in arms),
                *(_num(t["arms"][a] - t["arms"][ref], sign="+") for a in others),
                _num(t["signal"]), _num(t["noise"]), _snr(t["snr"], t["noise"]) + flag,
            ])  # fmt: skip
        rows.append([
            "**all tasks**", m["label"], *(_iv(m["all"]["arms"][a]) for a in arms),
            *(_iv(m["all"]["differences"][a], "+") for a in others),
            _num(m["snr"]["signal"]), _num(m["snr"]["noise"]), _snr(m["snr"]["snr"], m["snr"]["noise"]),
        ])  # fmt: skip
        if m["without_flagged"]:
            w = m["without_flagged"]
            rows.append([
                f"**without low-SNR tasks** ({len(m['kept_tasks'])})", m["label"], *(_iv(w["arms"][a]) for a in arms),
                *(_iv(w["differences"][a], "+") for a in others), "", "", "",
            ])  # fmt: skip
    k = first["snr"]["checkpoints"]
    lines = [
        "Per task and over all tasks (mean over tasks, [95% CI] over seeds and items), three readings of the "
        "same CORE items: centred accuracy, the log-prob of the correct continuation (bits per byte) and the "
        "margin of the correct option over the best wrong one (bits per byte, choice tasks); higher is better "
        "for all three. Signal: the largest difference between arms; noise: the standard deviation over each "
        f"run's last {k} checkpoints, averaged over runs (Signal and Noise, Heineman et al. 2025); tasks with "
        f"SNR < {cont['min_snr']:g} (evaluate.min_snr) are flagged and each aggregate is shown again without them."
    ]
    if k < 2:
        lines.append("Noise is unknown: each run has one evaluated checkpoint (set evaluate.last_k >= 2).")
    for metric, why in cont["missing"].items():
        lines.append(f"{CORE_METRICS[metric][0]}: {why}")
    return lines, header, rows
