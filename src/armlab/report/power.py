"""How small a difference an experiment can detect, and how many seeds a given one needs, from the
noise a pilot measured (the experiment's own finished runs, or another experiment's: `plan --pilot`).

A pilot's comparisons give, per metric, a single seed's paired-difference variance (training
noise plus the seed-by-item interaction) and the eval items' shared variance (`intervals`);
`stats.detectable` / `stats.seeds_needed` turn them into the minimum detectable difference at 95%
two-sided and 80% power. The item part does not shrink with seeds: only a larger eval set does.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.errors import ArmlabError
from armlab.report.stats import ALPHA, POWER, detectable, seeds_needed
from armlab.report.verdict import METRICS
from armlab.spec import Experiment


@dataclass(frozen=True)
class Spread:
    """The noise of one metric's arm difference, as a pilot measured it."""

    metric: str
    seed_var: float  # variance of one seed's difference between two arms
    item_var: float | None  # the eval items' shared variance (any seed count); None: no per-item data
    source: str  # which pilot, arms and seeds


def pilot_spreads(pilot: Experiment) -> list[Spread]:
    """Per metric, the largest noise among the pilot's arm comparisons (the cautious choice)."""
    from armlab.report.compare import analyse

    summary, _ = analyse(pilot)
    best: dict[str, Spread] = {}
    for c in summary.comparisons:
        if c.seed_var_per_seed is None:
            continue
        sa, sb = c.interval.seeds
        pairing = "paired" if c.interval.paired else "unpaired"
        src = f"pilot {pilot.name!r}: {c.arm} vs {c.reference}, {sa} vs {sb} seeds ({pairing})"
        if sa == sb:
            src = f"pilot {pilot.name!r}: {c.arm} vs {c.reference}, {sa} {pairing} seeds"
        s = Spread(c.metric, c.seed_var_per_seed, c.interval.item_var, src)
        if c.metric not in best or s.seed_var > best[c.metric].seed_var:
            best[c.metric] = s
    if not best:
        raise ArmlabError(
            f"pilot {pilot.name!r}: no arm has 2 or more finished seeds, so its seed-to-seed spread is unknown; "
            "train at least 2 seeds of two arms (e.g. a d12 pilot with train.seeds = [0, 1, 2])"
        )
    return [best[m] for m in METRICS if m in best]


def render_power(exp: Experiment, spreads: list[Spread], detect: float | None, pilot: Experiment) -> str:
    seeds = len(exp.train.seeds)
    lines = [f"noise ({spreads[0].source}):"]
    if pilot.name != exp.name and pilot.model.depth != exp.model.depth:
        lines.append(
            f"  the pilot is depth {pilot.model.depth}, this experiment depth {exp.model.depth}: "
            "assumes its seed and item noise carry over"
        )
    for s in spreads:
        label = METRICS[s.metric][0]
        item = s.item_var or 0.0
        mdd = detectable(s.seed_var, item, seeds)
        item_txt = (
            f"eval-item sd {item**0.5:.4f}"
            if s.item_var is not None
            else "eval-item noise unknown (no per-item data in eval.json: figures are lower bounds)"
        )
        can = (
            f"it detects differences >= {mdd:.4f} ({1 - ALPHA:.0%} two-sided, {POWER:.0%} power)"
            if mdd is not None
            else "it cannot test a difference at all (one seed has no seed spread to test against: use >= 2)"
        )
        lines.append(
            f"  {label}: one seed's difference sd {s.seed_var**0.5:.4f}, {item_txt}; with {seeds} "
            f"seed{'s' if seeds != 1 else ''} per arm (train.seeds) {can}"
        )
        if detect is not None:
            n = seeds_needed(s.seed_var, item, detect)
            if n is None:
                lines.append(
                    f"    to detect {detect:g}: no number of seeds suffices; the eval set's own noise hides it "
                    "(more eval items or documents would)"
                )
            else:
                lines.append(f"    to detect {detect:g}: {n} seeds per arm ({n * len(exp.arms)} runs)")
    return "\n".join(lines)


def plan_power(exp: Experiment, pilot: Experiment | None, detect: float | None) -> str:
    """`plan`'s noise section: from `pilot`'s finished runs, else the experiment's own (if any)."""
    from armlab.workdir import open_workdir

    if pilot is not None:
        return render_power(exp, pilot_spreads(pilot), detect, pilot)  # a named pilot must be usable
    hint = "run a pilot with >= 2 seeds per arm and pass --pilot DIR|EXP"
    if not exp.workdir_path.is_dir() or not open_workdir(exp, create=False).all_run_dirs():
        return f"noise: unknown (no finished runs yet); {hint} to say what this experiment can detect"
    try:
        return render_power(exp, pilot_spreads(exp), detect, exp)
    except ArmlabError as e:
        return f"noise: unknown ({e}); {hint}"
