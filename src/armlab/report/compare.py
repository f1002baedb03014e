"""`armlab compare`: check the finished runs are comparable, then estimate, test and report.

Comparability (DESIGN.md invariant 1): every run must come from this experiment, with the
experiment's `comparability()` (all but the arm's data), the same tokenizer, CORE from the same
bundle on the same items and val bpb over the same eval documents, and seeds from `train.seeds`.
Anything else is refused with the differing keys, never averaged in silently. Each run's final
values come from its final records (`complete.final_values`; a torn metrics log is refused).

Differences are reported against a reference arm (the first `random` arm, else the first arm)
with intervals that count seed and eval-item noise (`intervals`), one verdict line per arm
(`verdict`), the smallest difference the experiment could detect (`stats.detectable`) and what
differs in the arms' data (`datadiff`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from armlab.errors import ArmlabError
from armlab.report.complete import FinalValues, final_values
from armlab.report.continuous import continuous_summary
from armlab.report.evalcheck import check_evals
from armlab.report.identical import identical_groups
from armlab.report.intervals import RESAMPLES, SEED, ItemScores, arm_interval, difference_interval, replicates
from armlab.report.scores import Scores, bpb_scores, centre, core_scores
from armlab.report.stats import detectable
from armlab.report.verdict import METRICS, verdict_line
from armlab.runs import RUN_JSON, RunRecord, engine_differences, load_run
from armlab.spec import Experiment
from armlab.text import plural
from armlab.workdir import open_workdir


def collect_runs(
    exp: Experiment, exclude: list[str] | None = None
) -> tuple[list[RunRecord], list[RunRecord]]:
    """(finished runs, runs left out: unfinished, of unknown arms, or named in `exclude`)."""
    wd = open_workdir(exp, create=False)
    arms = {a.name for a in exp.arms}
    known = {d.name for d in wd.all_run_dirs()}
    unknown = sorted(set(exclude or []) - known)
    if unknown:
        raise ArmlabError(
            f"--exclude: no run named {', '.join(unknown)} (runs: {', '.join(sorted(known)) or 'none'})"
        )
    finished, other = [], []
    for d in wd.all_run_dirs():
        rec = load_run(d)
        if d.name in (exclude or []):
            other.append(rec)
            continue
        if rec.info.get("experiment") not in (None, exp.name):
            raise ArmlabError(
                f"{d}: run belongs to experiment {rec.info.get('experiment')!r}, not {exp.name!r}; "
                f"move it out of {wd.root}"
            )
        if rec.arm not in arms:
            other.append(rec)
        elif rec.state_name == "done":
            finished.append(rec)
        else:
            other.append(rec)
    return finished, other


def check_comparable(exp: Experiment, runs: list[RunRecord]) -> None:
    want = exp.comparability()
    odd = []  # every offending run in one message, so the user fixes them all in one go
    for r in runs:
        keys = r.spec_differences(want)
        if keys is None:
            raise ArmlabError(
                f"{r.dir / RUN_JSON}: no 'comparability' record; rerun this run with this armlab"
            )
        if keys:
            odd.append(f"{r.dir} (differs in {', '.join(keys)})")
    odd += engine_differences(runs)  # the same engine build, e.g. one nanochat commit, for every run
    if odd:
        raise ArmlabError(
            f"{plural(len(odd), 'run')} {'is' if len(odd) == 1 else 'are'} not comparable with experiment {exp.name!r}, e.g. trained with command-line "
            f"overrides such as --num-iterations: {'; '.join(odd)}; leave them out with --exclude RUN (or move "
            "them out of the workdir) to compare the others"
        )
    seen: dict[tuple[str, int], list[str]] = {}
    for r in runs:
        seen.setdefault((r.arm, r.seed), []).append(r.run)
    dups = [
        f"arm {arm!r} seed {seed}: {', '.join(names)}"
        for (arm, seed), names in seen.items()
        if len(names) > 1
    ]
    if dups:
        # Same arm, same seed, same config: the same training run again, not an independent sample.
        # Counting it twice would shrink the interval; keep one (paired comparisons are by seed).
        raise ArmlabError(
            f"several finished runs share a seed ({'; '.join(dups)}); they are repeats, not independent "
            "samples: keep one per seed (--exclude RUN the others) or train other seeds with --seed"
        )
    toks = {r.info.get("tokenizer_fingerprint") for r in runs}
    if len(toks) > 1:
        raise ArmlabError(
            f"runs used different tokenizers ({', '.join(sorted(map(str, toks)))}); rerun them on the shared one"
        )
    bundles = {(r.eval or {}).get("bundle", {}).get("sha256") for r in runs if r.core is not None}
    if len(bundles) > 1:
        raise ArmlabError(
            f"runs were CORE-evaluated on different bundles ({', '.join(sorted(map(str, bundles)))}); "
            "rerun `armlab evaluate EXP` so every run uses the same one"
        )


def check_seeds(exp: Experiment, runs: list[RunRecord]) -> None:
    """Refuse runs of seeds the experiment does not plan: they are not part of its design."""
    odd = [r for r in runs if r.seed not in exp.train.seeds]
    if odd:
        names = ", ".join(f"{r.run} (seed {r.seed})" for r in odd)
        raise ArmlabError(
            f"{names}: not in train.seeds {exp.train.seeds}; add the seed to train.seeds in the "
            f"experiment file, or leave the run out with --exclude {odd[0].run}"
        )


def check_eval_coverage(runs: list[RunRecord]) -> None:
    """Every run's val bpb must be one kind of measurement over the same eval tokens (a sample, or
    another method, is another measure): never mixed."""
    seen: dict[Any, list[str]] = {}
    for r in runs:
        ev = r.eval or {}
        method = ((ev.get("bpb") or {}).get("method") or {}).get("kind")
        seen.setdefault((ev.get("val_bpb_tokens"), ev.get("val_bpb_docs"), method), []).append(r.run)
    if len(seen) > 1:
        shown = "; ".join(
            f"{t or 0:,} tokens / {d} docs ({m or 'unknown method'}): {', '.join(n)}" for (t, d, m), n in seen.items()
        )
        raise ArmlabError(
            f"runs' val bpb cover different parts of the eval set ({shown}); rerun `armlab evaluate EXP "
            "--force` with the same --max-tokens for every run"
        )


def reference_arm(exp: Experiment, present: list[str]) -> str:
    for a in exp.arms:
        if a.kind == "random" and a.name in present:
            return a.name
    return present[0]


def _mean(xs: list[float | None]) -> dict[str, float] | None:
    vals = [x for x in xs if x is not None]
    return {"mean": float(np.mean(vals)), "n": len(vals)} if vals else None


class ArmData:
    """One arm's finished runs, their final values and per-item scores."""

    def __init__(self, exp: Experiment, arm: str, runs: list[RunRecord]):
        self.name = arm
        self.kind = exp.arm(arm).kind
        self.runs = sorted(runs, key=lambda r: r.seed)
        self.final: list[FinalValues] = [final_values(r) for r in self.runs]
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


def arm_summary(
    exp: Experiment, arm: ArmData, reps: dict[str, np.ndarray | None], items: dict[str, list[int]]
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": arm.kind,
        "runs": [
            {
                "run": r.run,
                "seed": r.seed,
                "val_bpb": f.val_bpb,
                "core": f.core,
                "tokens": f.tokens,
                "epoch": f.epoch,
                "train_time_s": f.train_time_s,
                "step": f.step,
            }
            for r, f in zip(arm.runs, arm.final, strict=True)
        ],
        "curves": {r.run: [[m["tokens"], m["val_bpb"]] for m in r.eval_lines] for r in arm.runs},
        "missing_items": {m: sc.missing for m, sc in arm.scores.items() if sc.missing},
    }
    base = _baselines(arm)
    for metric in METRICS:
        if metric not in arm.scores:
            entry[metric] = None
            continue
        values = np.array([v for v in arm.values(metric).values()])
        entry[metric] = arm_interval(
            values, reps.get(metric), items.get(metric, ()), _bounds(metric, base, False)
        ).as_dict()
    for key in ("tokens", "epoch", "train_time_s"):
        entry[key] = _mean([getattr(f, key) for f in arm.final])
    entry["core_tasks"] = {}
    sc = arm.scores.get("core")
    if sc is not None:
        tasks = [(r.eval or {}).get("core_tasks") or {} for r in arm.runs]
        for k, label in enumerate(tasks[0]):
            values = np.array([float(t[label]["centered"]) for t in tasks])
            task_reps = None if reps.get("core") is None else reps["core"][:, :, k : k + 1] / sc.scores.weight
            b = float(tasks[0][label]["random_baseline"])
            entry["core_tasks"][label] = arm_interval(
                values,
                task_reps,
                items["core"][k : k + 1] if task_reps is not None else (),
                (centre(b)[1], 1.0),
            ).as_dict()
    ev = arm.runs[0].eval or {}
    entry["eval"] = {
        "val_bpb_tokens": ev.get("val_bpb_tokens"),
        "val_bpb_docs": ev.get("val_bpb_docs"),
        "eval_tokens_cap": ev.get(
            "max_tokens", ev.get("eval_tokens")
        ),  # eval.json: max_tokens (older: eval_tokens)
        "core_items": {label: t.get("n") for label, t in (ev.get("core_tasks") or {}).items()},
    }
    return entry


def _per_seed_var(diff: dict[str, Any], a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """A single seed's difference variance (for planning a paired design), from the intervals."""
    if diff["paired"] and diff["seed_var"] is not None:
        return diff["seed_var"] * diff["seeds"][0]
    if a["seed_var"] is not None and b["seed_var"] is not None:
        return a["seed_var"] * a["seeds"][0] + b["seed_var"] * b["seeds"][0]  # no pairing gain assumed
    return None


def _refuse_single_arm(exp: Experiment, present: list[str], excluded: list[RunRecord]) -> None:
    if len(present) < 2:
        others = [a.name for a in exp.arms if a.name not in present]
        states = ", ".join(f"{r.run}: {r.state_name}" for r in excluded if r.arm in others) or "no runs"
        raise ArmlabError(
            f"only arm {present[0]!r} has finished runs ({', '.join(others)}: {states}); nothing to compare "
            f"yet: finish the other arms (`armlab run EXP`; `armlab status EXP` shows where they are)"
        )


def compare_arm(
    arm: ArmData,
    ref: ArmData,
    arms: dict[str, Any],
    reps: dict[str, dict[str, Any]],
    items: dict[str, list[int]],
) -> dict[str, dict[str, Any]]:
    """{metric: the difference arm - ref with its interval and detectable difference}."""
    out = {}
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
        ).as_dict()
        seed_var = _per_seed_var(iv, arms[arm.name][metric], arms[ref.name][metric])
        n = min(len(arm.seeds), len(ref.seeds))
        iv["detectable"] = detectable(seed_var, iv["item_var"] or 0.0, n) if seed_var is not None else None
        iv["seed_var_per_seed"] = seed_var
        out[metric] = iv
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


def _drop_copies(runs: list[RunRecord]) -> tuple[list[RunRecord], list[tuple[RunRecord, RunRecord]]]:
    """(runs with one of each group of identical runs, [(left-out copy, the run it copies)])."""
    copies = []
    for arm in dict.fromkeys(r.arm for r in runs):
        for group in identical_groups([r for r in runs if r.arm == arm]):
            copies += [(c, group[0]) for c in group[1:]]
    dropped = {id(c) for c, _ in copies}
    return [r for r in runs if id(r) not in dropped], copies


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


def _why_same(r: RunRecord) -> str:
    if r.engine == "nanochat":
        return (
            "; the nanochat engine's init seed is fixed (42) and this seed's file order is the other's: prepare the "
            "arm in more shard files"
        )
    return ""


def summarize(exp: Experiment, runs: list[RunRecord], excluded: list[RunRecord]) -> dict[str, Any]:
    """Everything the report shows, as plain data (summary.json); writes nothing."""
    runs, copies = _drop_copies(runs)
    excluded = excluded + [c for c, _ in copies]
    present = [a.name for a in exp.arms if any(r.arm == a.name for r in runs)]
    _refuse_single_arm(exp, present, excluded)
    data = {a: ArmData(exp, a, [r for r in runs if r.arm == a]) for a in present}
    reps: dict[str, dict[str, np.ndarray | None]] = {a: {} for a in data}
    items: dict[str, list[int]] = {}
    for metric in METRICS:
        if all(metric in d.scores for d in data.values()):
            r, items[metric] = _item_reps(list(data.values()), metric)
            for a, x in zip(data, r or [None] * len(data), strict=True):
                reps[a][metric] = x
    arms = {a: arm_summary(exp, d, reps[a], items) for a, d in data.items()}
    ref = data[reference_arm(exp, present)]
    comparisons, verdicts, warnings = [], [], []
    for arm in data.values():
        if arm is ref:
            continue
        per_metric = compare_arm(arm, ref, arms, reps, items)
        line = verdict_line(arm.name, ref.name, per_metric)
        verdicts.append(line)
        comparisons += [
            {"arm": arm.name, "reference": ref.name, "metric": m, **iv, "verdict": line}
            for m, iv in per_metric.items()
        ]
        warnings.append(_seed_warning(arm, ref))
    warnings += [
        f"{c.run} is identical to {first.run} (the same loss at every step: its seed changed nothing{_why_same(c)}); "
        f"counted once, left out"
        for c, first in copies
    ]
    for a in data:
        for m, why in arms[a]["missing_items"].items():
            warnings.append(f"{METRICS[m][0]} of {a}: {why}; its intervals count seed noise only")
    bundle = next(((r.eval or {}).get("bundle") for r in runs if r.core is not None), None)
    continuous = continuous_summary(exp, {a: d.runs for a, d in data.items()}, ref.name)
    return {
        "continuous": continuous,
        "seeding": _seeding(exp, runs),
        "experiment": exp.name,
        "fingerprint": exp.fingerprint(),
        "created": time.time(),
        "reference_arm": ref.name,
        "arms": arms,
        "comparisons": comparisons,
        "verdict": verdicts,
        "warnings": list(dict.fromkeys(w for w in warnings if w)),
        "bundle": bundle,
        "resamples": RESAMPLES,
        "bootstrap_seed": SEED,
        "train_eval_tokens": exp.train.eval_tokens,  # what the training curves' val bpb covers
        "excluded": [
            {"run": r.run, "arm": r.arm, "state": r.state_name, "dir": str(r.dir)} for r in excluded
        ],
    }


def print_verdict(summary: dict[str, Any]) -> None:
    """The verdict lines on stdout (one per arm against the reference), warnings on stderr."""
    from armlab.progress import console

    for line in summary["verdict"]:
        print(line, flush=True)
    for w in summary.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True)


def analyse(exp: Experiment, exclude: list[str] | None = None) -> tuple[dict[str, Any], list[RunRecord]]:
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
    summary["warnings"] += [f"left out: {u.reason}" for u in unevaluated] + unchecked
    return summary, finished


def compare(
    exp: Experiment, out: Path | None = None, notes: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write report.md, report.html, PNGs and summary.json; returns (report dir, summary).
    `notes` are extra lines for the report's Notes section (the demo explains itself there);
    `exclude` names runs to leave out (a smoke test with overrides, say). Nothing is written
    when the runs are refused."""
    from armlab.report.datadiff import data_difference
    from armlab.report.render import write_report

    summary, _ = analyse(exp, exclude)
    summary["data"] = data_difference(exp, list(summary["arms"]))
    summary["notes"] = list(notes or []) + summary["seeding"]
    out = Path(out) if out else open_workdir(exp, create=False).report_dir
    write_report(summary, out)
    return out, summary
