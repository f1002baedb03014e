"""`armlab compare`: check the finished runs are comparable, then tabulate, test and plot them.

Comparability (DESIGN.md invariant 1): every run must come from this experiment, with the
experiment's `comparability()` (all but the arm's data), the same tokenizer, and CORE from the
same bundle. Anything else is refused with the differing keys, never averaged in silently.
Differences are reported against a reference arm (the first `random` arm, else the first arm)
with a 95% t interval, paired by seed when both arms ran the same seeds, else Welch.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.report.stats import Difference, difference, mean_ci
from armlab.runs import RUN_JSON, RunRecord, engine_differences, load_run
from armlab.spec import Experiment, fingerprint_diff
from armlab.workdir import open_workdir

# metric -> (label, True when lower is better)
METRICS = {"val_bpb": ("val bpb", True), "core": ("CORE", False)}


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


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
    want = _plain(exp.comparability())
    odd = []  # every offending run in one message, so the user fixes them all in one go
    for r in runs:
        got = r.info.get("comparability")
        if got is None:
            raise ArmlabError(
                f"{r.dir / RUN_JSON}: no 'comparability' record; rerun this run with this armlab"
            )
        keys = fingerprint_diff(want, got)
        if keys:
            odd.append(f"{r.dir} (differs in {', '.join(keys)})")
    odd += engine_differences(runs)  # the same engine build, e.g. one nanochat commit, for every run
    if odd:
        raise ArmlabError(
            f"{len(odd)} run(s) are not comparable with experiment {exp.name!r}, e.g. trained with command-line "
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


def reference_arm(exp: Experiment, present: list[str]) -> str:
    for a in exp.arms:
        if a.kind == "random" and a.name in present:
            return a.name
    return present[0]


def verdict(metric: str, arm: str, ref: str, d: Difference) -> str:
    label, lower_better = METRICS[metric]
    if d.within_noise is None:
        return f"{arm} vs {ref} on {label}: {d.estimate.mean:+.4f} from one run each; no interval (run more seeds to tell signal from noise)"
    if d.within_noise:
        return (
            f"{arm} vs {ref} on {label}: {d.estimate.mean:+.4f} (95% CI {d.estimate.low:+.4f} to {d.estimate.high:+.4f}, "
            f"{d.method}): within noise, the interval includes 0"
        )
    better = (d.estimate.mean < 0) == lower_better
    return (
        f"{arm} is {'better' if better else 'worse'} than {ref} on {label}: {d.estimate.mean:+.4f} "
        f"(95% CI {d.estimate.low:+.4f} to {d.estimate.high:+.4f}, {d.method})"
    )


def summarize(exp: Experiment, runs: list[RunRecord], excluded: list[RunRecord]) -> dict[str, Any]:
    present = [a.name for a in exp.arms if any(r.arm == a.name for r in runs)]
    arms: dict[str, Any] = {}
    for arm in present:
        rs = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        entry: dict[str, Any] = {
            "kind": exp.arm(arm).kind,
            "runs": [
                {
                    "run": r.run,
                    "seed": r.seed,
                    "val_bpb": r.final_val_bpb,
                    "core": r.core,
                    "tokens": r.tokens,
                    "epoch": r.epoch,
                    "train_time_s": r.train_time_s,
                }
                for r in rs
            ],
            "curves": {r.run: [[m["tokens"], m["val_bpb"]] for m in r.eval_lines] for r in rs},
        }
        for key in ("val_bpb", "core", "tokens", "epoch", "train_time_s"):
            vals = [run[key] for run in entry["runs"] if run[key] is not None]
            entry[key] = mean_ci(vals).as_dict() if vals else None
        tasks: dict[str, list[float]] = {}
        for r in rs:
            for label, t in ((r.eval or {}).get("core_tasks") or {}).items():
                tasks.setdefault(label, []).append(float(t["centered"]))
        entry["core_tasks"] = {label: mean_ci(v).as_dict() for label, v in tasks.items()}
        arms[arm] = entry
    ref = reference_arm(exp, present)
    comparisons = []
    for arm in present:
        if arm == ref:
            continue
        for metric in METRICS:
            a = {r["seed"]: r[metric] for r in arms[arm]["runs"] if r[metric] is not None}
            b = {r["seed"]: r[metric] for r in arms[ref]["runs"] if r[metric] is not None}
            if not a or not b:
                continue
            d = difference(a, b)
            comparisons.append(
                {
                    "arm": arm,
                    "reference": ref,
                    "metric": metric,
                    **d.as_dict(),
                    "verdict": verdict(metric, arm, ref, d),
                }
            )
    bundle = next(((r.eval or {}).get("bundle") for r in runs if r.core is not None), None)
    return {
        "experiment": exp.name,
        "fingerprint": exp.fingerprint(),
        "created": time.time(),
        "reference_arm": ref,
        "arms": arms,
        "comparisons": comparisons,
        "bundle": bundle,
        "excluded": [
            {"run": r.run, "arm": r.arm, "state": r.state_name, "dir": str(r.dir)} for r in excluded
        ],
    }


def compare(
    exp: Experiment, out: Path | None = None, notes: list[str] | None = None, exclude: list[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Write report.md, report.html, PNGs and summary.json; returns (report dir, summary).
    `notes` are extra lines for the report's Notes section (the demo explains itself there);
    `exclude` names runs to leave out (a smoke test with overrides, say)."""
    from armlab.report.render import write_report

    finished, excluded = collect_runs(exp, exclude)
    if not finished:
        states = ", ".join(f"{r.run}: {r.state_name}" for r in excluded) or "no runs at all"
        raise ArmlabError(
            f"experiment {exp.name!r} has no finished runs to compare ({states}); "
            f"run `armlab run` first, or `armlab status` to see progress"
        )
    check_comparable(exp, finished)
    summary = summarize(exp, finished, excluded)
    summary["notes"] = list(notes or [])
    out = Path(out) if out else open_workdir(exp, create=False).report_dir
    write_report(summary, out)
    return out, summary
