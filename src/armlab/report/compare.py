"""`armlab compare`: check the finished runs are comparable (`checks`), then estimate, test and report.

Each run's final values come from its final records (`complete.final_values`; a torn metrics log
is refused). Differences are reported against a reference arm (the first `random` arm, else the
first arm) with intervals that count seed and eval-item noise (`intervals`), one verdict line per
arm (`verdict`), the smallest difference the experiment could detect with its range
(`stats.detectable`, `stats.variance_interval`), val bpb per group of eval documents (`groups`),
each ladder depth's ranking (`ladder`) and what differs in the arms' data (`datadiff`). Seeds that
are one run repeated are refused here, from their per-item results (`intervals.replicate_seeds`).
The result is one typed record (`summary.Summary`), written by `render`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from armlab.errors import ArmlabError
from armlab.report.checks import (
    NothingToCompare,
    check_comparable,
    check_eval_coverage,
    check_finite,
    check_seeds,
    collect_runs,
)
from armlab.report.complete import FinalValues, final_values
from armlab.report.continuous import continuous_summary
from armlab.report.evalcheck import check_evals
from armlab.report.groups import group_results, read_labels
from armlab.report.intervals import (
    RESAMPLES,
    SEED,
    Interval,
    ItemScores,
    arm_interval,
    difference_interval,
    replicate_seeds,
    replicates,
)
from armlab.report.ladder import ladder
from armlab.report.scores import Scores, bpb_scores, centre, core_scores
from armlab.report.stats import detectable, variance_interval
from armlab.report.summary import (
    ArmResult,
    Comparison,
    Detectable,
    EvalCoverage,
    ExcludedRun,
    Groups,
    RunResult,
    Summary,
)
from armlab.report.verdict import METRICS, verdict_line
from armlab.runs import RunRecord
from armlab.seeds import extra_seeds, planned_seeds
from armlab.spec import Experiment
from armlab.text import plural
from armlab.workdir import open_workdir


def check_independent(arms: list[ArmData]) -> None:
    """Seeds that are the same run again (an engine that ignores the seed, a copied run dir) are
    refused by name: counted as independent they would give an interval of width ~0 around the
    eval items' noise alone. Decided on per-item data where there is some (identical results on
    every document / item: `intervals.replicate_seeds`), else on an identical final val bpb (a
    continuous number two real seeds never share to the last bit)."""
    for a in arms:
        groups: list[list[int]] = []
        for metric, sc in a.scores.items():
            if sc.scores is not None:
                groups += replicate_seeds(sc.scores)
            elif metric == "val_bpb":
                by_value: dict[float, list[int]] = {}
                for seed, v in a.values(metric).items():
                    by_value.setdefault(v, []).append(seed)
                groups += [g for g in by_value.values() if len(g) > 1]
        if groups:
            runs = {r.seed: r.run for r in a.runs}
            same = "; ".join(" = ".join(runs[s] for s in g) for g in {tuple(g): g for g in groups}.values())
            raise ArmlabError(
                f"{same}: identical results, so these seeds are one run repeated, not independent samples "
                "(an engine that ignores the seed, e.g. nanochat's fixed init with an arm of one shard file, or a "
                "copied run dir); an interval from them would claim a "
                f"precision the experiment does not have: train seeds that differ, or keep one with --exclude"
            )


def _seeding(exp: Experiment, runs: list[RunRecord]) -> list[str]:
    """What a seed varied in these runs, for the report's notes."""
    out = []
    if exp.train.data_seeds is not None:
        pairs = ", ".join(f"{s}/{d}" for s, d in zip(exp.train.seeds, exp.train.data_seeds, strict=True))
        out.append(f"Seeds: init seed / data-order seed pairs {pairs} (train.data_seeds).")
    if any(r.engine == "nanochat" for r in runs):
        out.append(
            "Seeds of nanochat-engine runs vary the data order only (the arm's shard files are read in an order set "
            "by the data seed); the initial weights come from nanochat's fixed seed (42) in every run."
        )
    return out


def reference_arm(exp: Experiment, present: list[str]) -> str:
    for a in exp.arms:
        if a.kind == "random" and a.name in present:
            return a.name
    return present[0]


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return float(np.mean(vals)) if vals else None


class ArmData:
    """One arm's finished runs, their final values and per-item scores."""

    def __init__(self, exp: Experiment, arm: str, runs: list[RunRecord]):
        self.name = arm
        self.kind = exp.arm(arm).kind
        self.runs = sorted(runs, key=lambda r: r.seed)
        self.final: list[FinalValues] = [final_values(r) for r in self.runs]
        check_finite(self.runs, self.final)
        self.seeds = tuple(r.seed for r in self.runs)
        has_core = [f.core is not None for f in self.final]
        if any(has_core) and not all(has_core):
            missing = ", ".join(r.run for r, h in zip(self.runs, has_core, strict=True) if not h)
            raise ArmlabError(
                f"{missing}: no CORE in eval.json while other runs have it; run `armlab evaluate EXP`"
            )
        self.scores: dict[str, Scores] = {"val_bpb": bpb_scores(self.runs)}
        if all(has_core):
            self.scores["core"] = core_scores(self.runs)

    def values(self, metric: str) -> dict[int, float]:
        return {s: getattr(f, metric) for s, f in zip(self.seeds, self.final, strict=True)}


def _bounds(metric: str, baselines: list[float], diff: bool) -> tuple[float, float]:
    """The range of the metric (or of a difference of two arms' values)."""
    lo, hi = (float(np.mean([centre(b)[1] for b in baselines])), 1.0) if metric == "core" else (0.0, math.inf)
    return (lo - hi, hi - lo) if diff else (lo, hi)


def _baselines(arm: ArmData) -> list[float]:
    tasks = (arm.runs[0].eval or {}).get("core_tasks") or {}
    return [float(t["random_baseline"]) for t in tasks.values()]


def _item_reps(arms: list[ArmData], metric: str) -> tuple[list[np.ndarray] | None, list[int]]:
    """Paired item resamples (B, S, K) per arm, weighted to sum to the metric; None if any arm lacks them."""
    scores: list[ItemScores | None] = [a.scores[metric].scores for a in arms]
    if any(s is None for s in scores):
        return None, []
    reps = replicates(scores, RESAMPLES, SEED)
    return [r * s.weight for r, s in zip(reps, scores, strict=True)], [st.items for st in scores[0].strata]


def _curve(rec: RunRecord) -> list[tuple[float, float]]:
    """The run's in-training val bpb by tokens (non-finite points left out: JSON has no NaN)."""
    pts = [(float(m["tokens"]), float(m["val_bpb"])) for m in rec.eval_lines if "tokens" in m]
    return [p for p in pts if math.isfinite(p[1])]


def arm_summary(
    exp: Experiment,
    arm: ArmData,
    reps: dict[str, np.ndarray | None],
    items: dict[str, list[int]],
    planned: list[int],
) -> ArmResult:
    base = _baselines(arm)
    intervals: dict[str, Interval | None] = {}
    for metric in METRICS:
        if metric not in arm.scores:
            intervals[metric] = None
            continue
        values = np.array(list(arm.values(metric).values()))
        intervals[metric] = arm_interval(
            values, reps.get(metric), items.get(metric, ()), _bounds(metric, base, False)
        )
    core_tasks: dict[str, Interval] = {}
    sc = arm.scores.get("core")
    if sc is not None:
        tasks = [(r.eval or {}).get("core_tasks") or {} for r in arm.runs]
        for k, label in enumerate(tasks[0]):
            values = np.array([float(t[label]["centered"]) for t in tasks])
            task_reps = None if reps.get("core") is None else reps["core"][:, :, k : k + 1] / sc.scores.weight
            b = float(tasks[0][label]["random_baseline"])
            core_tasks[label] = arm_interval(
                values,
                task_reps,
                items["core"][k : k + 1] if task_reps is not None else (),
                (centre(b)[1], 1.0),
            )
    ev = arm.runs[0].eval or {}
    return ArmResult(
        kind=arm.kind,
        runs=[
            RunResult(
                run=r.run, seed=r.seed, val_bpb=f.val_bpb, core=f.core, tokens=f.tokens, epoch=f.epoch,
                train_time_s=f.train_time_s, step=f.step,
            )  # fmt: skip
            for r, f in zip(arm.runs, arm.final, strict=True)
        ],
        planned_seeds=planned,
        curves={r.run: _curve(r) for r in arm.runs},
        val_bpb=intervals["val_bpb"],
        core=intervals["core"],
        core_tasks=core_tasks,
        tokens=_mean([f.tokens for f in arm.final]),
        epoch=_mean([f.epoch for f in arm.final]),
        train_time_s=_mean([f.train_time_s for f in arm.final]),
        eval=EvalCoverage(
            val_bpb_tokens=ev.get("val_bpb_tokens"),
            val_bpb_docs=ev.get("val_bpb_docs"),
            eval_tokens_cap=ev.get("max_tokens", ev.get("eval_tokens")),  # eval.json: max_tokens (older: eval_tokens)
            core_items={label: t.get("n") for label, t in (ev.get("core_tasks") or {}).items()},
        ),
        missing_items={m: sc.missing for m, sc in arm.scores.items() if sc.missing},
    )


def _per_seed_var(diff: Interval, a: Interval, b: Interval) -> tuple[float, float] | None:
    """A single seed's difference variance (for planning a paired design) and its degrees of
    freedom, from the intervals."""
    if diff.paired and diff.seed_var is not None:
        return diff.seed_var * diff.seeds[0], diff.seeds[0] - 1
    if a.seed_var is not None and b.seed_var is not None:  # no pairing gain assumed
        return a.seed_var * a.seeds[0] + b.seed_var * b.seeds[0], diff.df or min(a.seeds[0], b.seeds[0]) - 1
    return None


def _refuse_single_arm(exp: Experiment, present: list[str], excluded: list[RunRecord]) -> None:
    if len(present) < 2:
        others = [a.name for a in exp.arms if a.name not in present]
        states = ", ".join(f"{r.run}: {r.state_name}" for r in excluded if r.arm in others) or "no runs"
        raise NothingToCompare(
            f"only arm {present[0]!r} has finished runs ({', '.join(others)}: {states}); nothing to compare "
            f"yet: finish the other arms (`armlab run EXP`; `armlab status EXP` shows where they are)"
        )


def detectable_range(seed_var: float, df: float, item_var: float, seeds: int) -> Detectable | None:
    """The detectable difference at the observed seed variance and at both ends of its 95% interval."""
    mid = detectable(seed_var, item_var, seeds)
    if mid is None:
        return None
    lo_var, hi_var = variance_interval(seed_var, df)
    return Detectable(
        value=mid, low=detectable(lo_var, item_var, seeds), high=detectable(hi_var, item_var, seeds)
    )


def compare_arm(
    arm: ArmData,
    ref: ArmData,
    arms: dict[str, ArmResult],
    reps: dict[str, dict[str, Any]],
    items: dict[str, list[int]],
    level: float = 0.95,
) -> list[Comparison]:
    """Per metric, the difference arm - ref with its interval (at `level`: 95%, or over the looks
    of `run --until-decided`) and detectable difference."""
    out = []
    for metric in METRICS:
        if metric not in arm.scores or metric not in ref.scores:
            continue
        iv = difference_interval(
            arm.values(metric),
            ref.values(metric),
            reps[arm.name].get(metric),
            reps[ref.name].get(metric),
            items.get(metric, ()),
            _bounds(metric, _baselines(arm), True),
            level,
        )
        per = _per_seed_var(iv, arms[arm.name].interval(metric), arms[ref.name].interval(metric))
        n = min(len(arm.seeds), len(ref.seeds))
        det = detectable_range(per[0], per[1], iv.item_var or 0.0, n) if per else None
        out.append(
            Comparison(
                arm=arm.name, reference=ref.name, metric=metric, interval=iv, detectable=det,
                seed_var_per_seed=per[0] if per else None,
            )  # fmt: skip
        )
    return out


def _seed_warning(arm: ArmData, ref: ArmData) -> str | None:
    if len(arm.seeds) != len(ref.seeds):
        return (
            f"unequal seed counts: {arm.name} has {plural(len(arm.seeds), 'finished run')}, {ref.name} {len(ref.seeds)}; "
            "the comparison is unpaired (Welch) and weaker than it could be: finish the missing seeds"
        )
    if arm.seeds != ref.seeds:
        return f"{arm.name} and {ref.name} ran different seeds ({arm.seeds} vs {ref.seeds}): unpaired"
    return None


def _planned_note(arms: dict[str, ArmResult]) -> str | None:
    """"2 of 3 planned seeds per arm finished" when an arm has fewer finished seeds than planned."""
    short = {a: (len(e.runs), len(e.planned_seeds)) for a, e in arms.items() if len(e.runs) < len(e.planned_seeds)}
    if not short:
        return None
    counts = {(len(e.runs), len(e.planned_seeds)) for e in arms.values()}
    if len(counts) == 1:
        done, planned = next(iter(counts))
        return f"{done} of {planned} planned seeds per arm finished"
    return "; ".join(f"{a}: {d} of {p} planned seeds finished" for a, (d, p) in short.items())


def summarize(exp: Experiment, runs: list[RunRecord], excluded: list[RunRecord]) -> Summary:
    """Everything the report shows, as a typed record (summary.json); writes nothing."""
    present = [a.name for a in exp.arms if any(r.arm == a.name for r in runs)]
    _refuse_single_arm(exp, present, excluded)
    data = {a: ArmData(exp, a, [r for r in runs if r.arm == a]) for a in present}
    check_independent(list(data.values()))
    reps: dict[str, dict[str, np.ndarray | None]] = {a: {} for a in data}
    items: dict[str, list[int]] = {}
    for metric in METRICS:
        if all(metric in d.scores for d in data.values()):
            r, items[metric] = _item_reps(list(data.values()), metric)
            for a, x in zip(data, r or [None] * len(data), strict=True):
                reps[a][metric] = x
    planned = planned_seeds(exp)
    arms = {a: arm_summary(exp, d, reps[a], items, planned[a]) for a, d in data.items()}
    ref = data[reference_arm(exp, present)]
    note = _planned_note(arms)
    comparisons: list[Comparison] = []
    verdicts, warnings = [], []
    for arm in data.values():
        if arm is ref:
            continue
        per_metric = compare_arm(arm, ref, arms, reps, items, extra_seeds(exp).level)
        verdicts.append(verdict_line(arm.name, ref.name, {c.metric: c.interval for c in per_metric}, note))
        comparisons += per_metric
        warnings.append(_seed_warning(arm, ref))
    for a, e in arms.items():
        for m, why in e.missing_items.items():
            warnings.append(f"{METRICS[m][0]} of {a}: {why}; its intervals count seed noise only")
    bundle = next(((r.eval or {}).get("bundle") for r in runs if r.core is not None), None)
    groups, groups_missing = per_group(exp, data, ref.name)
    return Summary(
        experiment=exp.name,
        fingerprint=exp.fingerprint(),
        created=time.time(),
        reference_arm=ref.name,
        arms=arms,
        comparisons=comparisons,
        verdict=verdicts,
        warnings=list(dict.fromkeys(w for w in warnings if w)),
        bundle=bundle,
        resamples=RESAMPLES,
        bootstrap_seed=SEED,
        train_eval_tokens=exp.train.eval_tokens,  # what the training curves' val bpb covers
        excluded=[ExcludedRun(run=r.run, arm=r.arm, state=r.state_name, dir=str(r.dir)) for r in excluded],
        groups=groups,
        groups_missing=groups_missing,
        decided=[r.reason for r in extra_seeds(exp).rounds],
        continuous=continuous_summary(exp, {a: d.runs for a, d in data.items()}, ref.name),
    )


def per_group(exp: Experiment, data: dict[str, ArmData], ref: str) -> tuple[Groups | None, str | None]:
    """Val bpb per `[report] group_column` group (`groups`), or why there is none."""
    if not exp.report.group_column:
        return None, None
    lacking = [a.scores["val_bpb"].missing for a in data.values() if a.scores["val_bpb"].scores is None]
    if lacking:
        return None, lacking[0]
    labels = read_labels(exp)
    if isinstance(labels, str):
        return None, labels
    res = group_results(labels, {a: d.scores["val_bpb"].scores for a, d in data.items()}, ref)
    return (None, res) if isinstance(res, str) else (res, None)


def print_verdict(summary: Summary) -> None:
    """The verdict lines on stdout (one per arm against the reference, then per group and per
    ladder depth), warnings on stderr."""
    from armlab.progress import console

    extra = (summary.groups.verdict if summary.groups else []) + (summary.ladder.verdict if summary.ladder else [])
    for line in [*summary.verdict, *extra]:
        print(line, flush=True)
    for w in summary.warnings:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def analyse(exp: Experiment, exclude: list[str] | None = None) -> tuple[Summary, list[RunRecord]]:
    """Collect, check and summarise the finished runs (no files written): (summary, finished runs)."""
    finished, excluded = collect_runs(exp, exclude)
    if not finished:
        states = ", ".join(f"{r.run}: {r.state_name}" for r in excluded) or "no runs at all"
        raise ArmlabError(
            f"experiment {exp.name!r} has no finished runs to compare ({states}); "
            f"run `armlab run` first, or `armlab status` to see progress"
        )
    check_comparable(exp, finished)
    check_seeds(exp, finished)
    finished, unevaluated, unchecked = check_evals(exp, finished)  # eval.json tied to its run, or left out
    if not finished:
        raise ArmlabError(
            f"experiment {exp.name!r} has no evaluated runs to compare: {'; '.join(u.reason for u in unevaluated)}"
        )
    check_eval_coverage(finished)
    summary = summarize(exp, finished, excluded + [u.run for u in unevaluated])
    left = [f"left out: {u.reason}" for u in unevaluated]
    return summary.with_(warnings=summary.warnings + left + unchecked, notes=_seeding(exp, finished)), finished


def compare_rungs(exp: Experiment, target: Summary) -> dict[int, Summary | str]:
    """Each depth of the ladder compared on its own (`target`: the experiment's own depth's), or
    the one line saying why it cannot be yet."""
    out: dict[int, Summary | str] = {}
    for rung in exp.rungs():
        if rung.model.depth == exp.model.depth:
            out[rung.model.depth] = target
            continue
        try:
            out[rung.model.depth] = analyse(rung)[0]
        except ArmlabError as e:
            out[rung.model.depth] = str(e)
    return out


def compare(
    exp: Experiment, out: Path | None = None, notes: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[Path, Summary]:
    """Write report.md, report.html, PNGs and summary.json; returns (report dir, summary).
    `notes` are extra lines for the report's Notes section (the demo explains itself there);
    `exclude` names runs to leave out (a smoke test with overrides, say). Nothing is written
    when the runs are refused."""
    from armlab.report.datadiff import data_difference
    from armlab.report.render import write_report

    summary, _ = analyse(exp, exclude)
    summary = summary.with_(data=data_difference(exp, list(summary.arms)), notes=list(notes or []) + summary.notes)
    if exp.ladder.depths:
        summary = summary.with_(ladder=ladder(exp, compare_rungs(exp, summary)))
    out = Path(out) if out else open_workdir(exp, create=False).report_dir
    write_report(summary, out)
    return out, summary
