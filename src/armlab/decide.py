"""Seeds until decided: after each round of seeds, one more seed of the arms the runs cannot yet
tell from the reference arm, while the power calculation says `max_seeds` seeds per arm can still
tell them apart; then stop, saying why.

Per arm against the reference, on the verdict's headline metric (CORE when the runs have it, else
val bpb):

- **decided**: its difference interval excludes 0 at the sequential level (below);
- **more**: it straddles 0 and `stats.seeds_needed` (from this experiment's own seed and eval-item
  noise, `Comparison.seed_var_per_seed` and the interval's item part, at the sequential level)
  says a true difference the size of the estimate is detected (80% power) within `max_seeds`
  seeds: one more seed, for the arm and for the reference (the same seed number: the design
  stays paired);
- **cannot**: it straddles 0 and `max_seeds` seeds would not detect a difference that size:
  "cannot be decided within N seeds: |difference| < X", X the smallest difference N seeds detect
  (`stats.detectable`); also when it has `max_seeds` seeds already.

Looking again after every seed and stopping at the first interval that excludes 0 would make a
false "beats" likelier than 5% (optional stopping). So the stopping rule uses intervals at level
1 - 0.05 / L, L the most looks the loop can take (Bonferroni over the looks): every claim it
stops on holds at 95% however many looks it took. `seeds.json` records L, and `compare` then
makes every difference interval of the experiment at that level (`ExtraSeeds.level`), so the
report's verdict and the loop's never disagree.

The seeds it adds are recorded in `<workdir>/seeds.json` (`armlab.seeds`): the run set that the
schedule, `status` and `compare` see. `run_until_decided` is the loop of `armlab run`; `look` one
look at a finished round; `launch_round` the same look for `armlab launch`, whose runs train
detached (one look per launch, once the round's runs are done and evaluated).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from armlab.errors import ArmlabError
from armlab.report.intervals import at_level
from armlab.report.stats import detectable, seeds_needed
from armlab.report.summary import Summary
from armlab.report.verdict import METRICS, digits
from armlab.seeds import (
    SEEDS_JSON,
    ExtraSeeds,
    Round,
    planned_runs,
    planned_seeds,
    read_extra_seeds,
    write_extra_seeds,
)
from armlab.spec import Experiment
from armlab.workdir import atomic_write_bytes, open_workdir

T = TypeVar("T")


@dataclass(frozen=True)
class Decision:
    arm: str
    metric: str
    state: str  # "decided" | "more" | "cannot"
    line: str


def headline(summary: Summary) -> str:
    return next(m for m in METRICS if any(c.metric == m for c in summary.comparisons))


def looks(start: int, max_seeds: int) -> int:
    """The most times the loop can look: at `start` seeds per arm, then after each added seed."""
    return max(1, max_seeds - start + 1)


def decide(summary: Summary, max_seeds: int, start: int) -> list[Decision]:
    """One decision per arm against the reference (see the module docstring)."""
    metric = headline(summary)
    label = METRICS[metric][0]
    level = 1 - 0.05 / looks(start, max_seeds)
    out = []
    for c in (c for c in summary.comparisons if c.metric == metric):
        iv = c.interval
        n = min(iv.seeds)
        d = digits(iv.low, iv.high)
        vs = f"{c.arm} vs {c.reference}"
        seq = at_level(iv, level)
        if seq.low is not None and not (seq.low <= 0 <= seq.high):
            out.append(Decision(c.arm, metric, "decided", f"{vs}: decided on {label} with {n} seeds "
                                f"({iv.estimate:+.{d}f}, {level:.2%} CI {seq.low:+.{d}f} to {seq.high:+.{d}f})"))  # fmt: skip
            continue
        if c.seed_var_per_seed is None:  # fewer than 2 seeds: no seed noise measured yet
            state = "more" if n < max_seeds else "cannot"
            out.append(Decision(c.arm, metric, state, f"{vs}: {n} seed each, no seed noise measured yet"))
            continue
        item = iv.item_var or 0.0
        need = seeds_needed(c.seed_var_per_seed, item, abs(iv.estimate), alpha=1 - level)
        if n < max_seeds and need is not None and need <= max_seeds:
            out.append(Decision(c.arm, metric, "more", f"{vs}: {label} {iv.estimate:+.{d}f} within noise at "
                                f"{100 * level:.4g}% with {n} seeds; a true difference that size is detected with "
                                f"~{need} seeds (80% power)"))  # fmt: skip
            continue
        x = detectable(c.seed_var_per_seed, item, max_seeds, alpha=1 - level)
        bound = f"{x:.{d}f}" if x is not None else "?"
        out.append(Decision(c.arm, metric, "cannot", f"{vs}: cannot be decided within "
                            f"{max_seeds} seeds: |difference| < {bound} on {label} (estimate {iv.estimate:+.{d}f})"))  # fmt: skip
    return out


def next_round(exp: Experiment, summary: Summary, max_seeds: int) -> tuple[dict[str, int], list[Decision]]:
    """The seed to add per arm (empty: stop) and the decisions behind it. The reference arm gets
    the seed too when any arm does; the seed number is one past every seed planned so far."""
    planned = planned_seeds(exp)
    decisions = decide(summary, max_seeds, len(exp.train.seeds))
    more = [d.arm for d in decisions if d.state == "more"]
    if not more:
        return {}, decisions
    seed = max(s for v in planned.values() for s in v) + 1
    return {a: seed for a in [summary.reference_arm, *more]}, decisions


def record(
    exp: Experiment, summary: Summary, add: dict[str, int], decisions: list[Decision], max_seeds: int
) -> None:
    """Add the round's seeds (and the round) to `<workdir>/seeds.json`."""
    wd = open_workdir(exp, create=False)
    old = read_extra_seeds(wd)
    arms = {a: list(v) for a, v in old.arms.items()}
    for a, s in add.items():
        arms.setdefault(a, []).append(s)
    reason = "; ".join(d.line for d in decisions)
    rnd = Round(
        seeds={a: len(e.runs) for a, e in summary.arms.items()},
        undecided=[d.arm for d in decisions if d.state != "decided"],
        added=dict(add),
        reason=reason,
    )
    write_extra_seeds(wd, ExtraSeeds(arms, [*old.rounds, rnd], max_seeds, len(exp.train.seeds)))


def look(exp: Experiment, summary: Summary, max_seeds: int, say: Callable[[str], None]) -> dict[str, int]:
    """One look at a finished round: the decisions said and recorded in seeds.json; the seed added
    per arm (empty: stop, and why said)."""
    add, decisions = next_round(exp, summary, max_seeds)
    for d in decisions:
        say(f"decide: {d.line}")
    record(exp, summary, add, decisions, max_seeds)
    if not add:
        undecided = [d for d in decisions if d.state != "decided"]
        say("decide: stop: " + ("every arm is decided" if not undecided else
                               f"{len(undecided)} arm(s) cannot be decided within {max_seeds} seeds"))  # fmt: skip
    else:
        say(f"decide: adding seed {next(iter(add.values()))} to {', '.join(add)}")
    return add


def _check_max_seeds(exp: Experiment, max_seeds: int) -> None:
    if max_seeds < len(exp.train.seeds):
        raise ArmlabError(
            f"--max-seeds {max_seeds} is fewer than train.seeds ({len(exp.train.seeds)}); give at least that many"
        )


def run_until_decided(
    exp: Experiment,
    max_seeds: int,
    summary: Summary | None,
    train_round: Callable[[dict[str, int]], Summary | None],
    say: Callable[[str], None],
) -> Summary | None:
    """From the first round's `summary`, add seeds until decided (see the module docstring).
    `train_round({arm: seed})` trains, evaluates and compares those runs; returns the last summary."""
    _check_max_seeds(exp, max_seeds)
    while summary is not None:
        add = look(exp, summary, max_seeds, say)
        if not add:
            return summary
        summary = train_round(add)
    return summary


def unfinished_runs(exp: Experiment) -> list[str]:
    """The planned runs (seeds.json's included) that are not done and evaluated here yet."""
    from armlab.runs import EVAL_JSON, RunState, read_run_state

    wd = open_workdir(exp, create=False)
    out = []
    for arm, _, name in planned_runs(exp):
        d = wd.run_dir(arm, name)
        st = read_run_state(d)
        if st is None or st.state != RunState.DONE or not (d / EVAL_JSON).is_file():
            out.append(name)
    return out


def launch_round(exp: Experiment, max_seeds: int, say: Callable[[str], None], launch: Callable[[], T]) -> T:
    """`armlab launch --until-decided`: the loop of `armlab run`, one look per launch, since launch
    returns while its runs train. When every planned run is done and evaluated in this workdir (a
    cluster's shared filesystem), compare them and look once: the seeds it adds go to seeds.json,
    and the launch that follows places them on the lanes like any other run. Otherwise say what the
    round still waits for; the launch then starts what is missing, as always. A launch that is
    refused (`launch()` raises ArmlabError) leaves seeds.json as it was: the next one looks again,
    at the same runs, and decides the same."""
    from armlab.report.compare import NothingToCompare, analyse

    _check_max_seeds(exp, max_seeds)
    root = open_workdir(exp, create=False).root
    if not root.is_dir():
        say("decide: nothing trained yet: this launch starts the first round (train.seeds)")
        return launch()
    waiting = unfinished_runs(exp)
    if waiting:
        say(f"decide: the round is not finished ({', '.join(waiting)} not done and evaluated): "
            "rerun `armlab launch --until-decided` once they are (`armlab evaluate`), to decide the next")  # fmt: skip
        return launch()
    try:
        summary = analyse(exp)[0]
    except NothingToCompare as e:
        say(f"decide: {e}")
        return launch()
    path = root / SEEDS_JSON
    before = path.read_bytes() if path.is_file() else None
    look(exp, summary, max_seeds, say)
    try:
        return launch()
    except ArmlabError:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            atomic_write_bytes(path, before)
        raise
