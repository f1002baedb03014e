"""The per-item scores in runs' eval.json, as `intervals.ItemScores` (one arm, one metric).

eval.json (armlab.evaluate.record.EvalResult): each CORE task holds, per item in a fixed order,
`correct` (0/1), `logprob` and `bytes` of the correct continuation and (choice tasks) `margin`, and
`random_baseline` (percent); `val_bpb_per_doc = {"nats": [...], "bytes": [...]}` holds
per-document sums in eval-set order. Where they are missing, `None` comes back with the reason,
and the report falls back to a seed-only interval and says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from armlab.errors import ArmlabError
from armlab.evaluate.record import EvalResult, TaskResult
from armlab.report.intervals import ItemScores, Stratum
from armlab.runs import EVAL_JSON, RunRecord

CHECK_TOL = 1e-6  # per-item data must reproduce the recorded figure (else they are not its items)


@dataclass(frozen=True)
class Scores:
    """An arm's per-item scores for one metric, or why there are none."""

    scores: ItemScores | None
    missing: str | None = None  # the reason, when scores is None


def centre(baseline_pct: float) -> tuple[float, float]:
    """(scale, offset) of centring: (acc - b) / (1 - b), b the baseline as a fraction."""
    b = baseline_pct / 100
    return 1 / (1 - b), -b / (1 - b)


def _tasks(r: RunRecord) -> dict[str, TaskResult]:
    core = EvalResult.from_json(r.eval or {}, r.run).core
    return dict(core.tasks) if core else {}


def _same_items(runs: Sequence[RunRecord], tasks: list[dict[str, TaskResult]], label: str, field: str) -> None:
    n = len(getattr(tasks[0][label], field) or [])
    for r, t in zip(runs, tasks, strict=True):
        cell = t.get(label)
        if cell is None or len(getattr(cell, field) or []) != n:
            raise ArmlabError(
                f"{r.dir / EVAL_JSON}: CORE task {label!r} was scored on other items than in "
                f"{runs[0].run}; rerun `armlab evaluate EXP --force` so every run uses the same items"
            )


def core_scores(runs: Sequence[RunRecord]) -> Scores:
    """Per-item CORE outcomes of `runs` (sorted by seed): one stratum per task."""
    runs = sorted(runs, key=lambda r: r.seed)
    tasks = [_tasks(r) for r in runs]
    lacking = [r.run for r, t in zip(runs, tasks, strict=True) if not t or any(v.correct is None for v in t.values())]
    if lacking:
        return Scores(None, f"no per-item CORE results in eval.json of {', '.join(lacking)}")
    strata = []
    for label in tasks[0]:
        _same_items(runs, tasks, label, "correct")
        rows = []
        for r, t in zip(runs, tasks, strict=True):
            cell = t[label]
            acc = float(np.mean(cell.correct))
            if abs(acc - cell.accuracy) > CHECK_TOL:
                raise ArmlabError(
                    f"{r.dir / EVAL_JSON}: task {label!r}'s per-item results give accuracy {acc:.6f}, "
                    f"not the recorded {cell.accuracy:.6f}; rerun `armlab evaluate EXP --force`"
                )
            rows.append(cell.correct)
        scale, offset = centre(float(tasks[0][label].random_baseline))
        n = len(rows[0])
        strata.append(Stratum(label, np.asarray(rows, dtype=np.float64), np.ones(n), scale, offset))
    return Scores(ItemScores(tuple(r.seed for r in runs), tuple(strata), 1 / len(strata)))


def continuous_scores(runs: Sequence[RunRecord], kind: str) -> Scores:
    """Per-item continuous CORE of `runs` (sorted by seed), one stratum per task that has it:

    - kind "lp": the log-prob of the correct continuations in bits per byte, pooled per task
      (nats / (ln 2 * bytes), a ratio over items like val bpb); the metric is their mean over tasks;
    - kind "margin": the mean per-item margin (bits per byte, correct minus best wrong) of each
      multiple-choice and schema task; the metric is their mean over those tasks.
    """
    runs = sorted(runs, key=lambda r: r.seed)
    tasks = [_tasks(r) for r in runs]
    field = "logprob" if kind == "lp" else "margin"
    if not tasks[0]:
        return Scores(None, "no CORE in eval.json")
    labels = [label for label, t in tasks[0].items() if getattr(t, field) is not None]
    lacking = [r.run for r, t in zip(runs, tasks, strict=True) if any(getattr(t.get(x), field, None) is None
                                                                      for x in labels)]  # fmt: skip
    if lacking or not labels:
        why = f"eval.json of {', '.join(lacking)}" if lacking else "any task"
        return Scores(None, f"no per-item continuous CORE ({field}) in {why}; rerun `armlab evaluate EXP --force`")
    strata = []
    for label in labels:
        _same_items(runs, tasks, label, field)
        num = np.asarray([getattr(t[label], field) for t in tasks], dtype=np.float64)
        if kind == "lp":
            den = np.asarray([t[label].bytes for t in tasks], dtype=np.float64)
            den = den[0] if all(np.array_equal(d, den[0]) for d in den) else den
            strata.append(Stratum(label, num, den, 1 / math.log(2)))
        else:
            strata.append(Stratum(label, num, np.ones(num.shape[1])))
    return Scores(ItemScores(tuple(r.seed for r in runs), tuple(strata), 1 / len(strata)))


def bpb_scores(runs: Sequence[RunRecord]) -> Scores:
    """Per-document nats and bytes of `runs` (sorted by seed): one stratum, the eval set."""
    runs = sorted(runs, key=lambda r: r.seed)
    per_doc = [(r.eval or {}).get("val_bpb_per_doc") for r in runs]
    lacking = [r.run for r, p in zip(runs, per_doc, strict=True) if not p]
    if lacking:
        return Scores(None, f"no per-document val bpb in eval.json of {', '.join(lacking)}")
    nats = [np.asarray(p["nats"], dtype=np.float64) for p in per_doc]
    nbytes = [np.asarray(p["bytes"], dtype=np.float64) for p in per_doc]
    for r, n, b in zip(runs, nats, nbytes, strict=True):
        if len(n) != len(nats[0]) or len(b) != len(n):
            raise ArmlabError(
                f"{r.dir / EVAL_JSON}: val bpb covers {len(n):,} documents, {runs[0].run}'s "
                f"{len(nats[0]):,}; rerun `armlab evaluate EXP --force` so every run scores the same eval set"
            )
        got = n.sum() / (math.log(2) * b.sum())
        if abs(got - float(r.eval["val_bpb"])) > CHECK_TOL * max(1.0, got):
            raise ArmlabError(
                f"{r.dir / EVAL_JSON}: per-document sums give val bpb {got:.6f}, not the recorded "
                f"{r.eval['val_bpb']:.6f}; rerun `armlab evaluate EXP --force`"
            )
    same_bytes = all(np.array_equal(b, nbytes[0]) for b in nbytes)
    den = nbytes[0] if same_bytes else np.stack(nbytes)
    stratum = Stratum("eval set", np.stack(nats), den, 1 / math.log(2))
    return Scores(ItemScores(tuple(r.seed for r in runs), (stratum,)))


def core_bounds(scores: ItemScores | None, baselines: Sequence[float]) -> tuple[float, float]:
    """The range CORE can take: every task at 0% (its most negative centred score) up to 1."""
    if not baselines:
        return (-math.inf, 1.0)
    return (float(np.mean([centre(b)[1] for b in baselines])), 1.0)
