"""Which finished runs `compare` may put side by side, and the refusals that say which may not.

Comparability (DESIGN.md invariant 1): every run must come from this experiment, with the
experiment's `comparability()` (all but the arm's data), the same tokenizer, CORE from the same
bundle on the same items and val bpb over the same eval documents, seeds the experiment plans
(`train.seeds`, and those `run --until-decided` added), finite final values, and no diverged run
left out unnamed. Anything else is refused with the runs and the differing keys, never averaged in
silently. In a `[ladder]`, the runs of other depths are another rung's, set aside here.
"""

from __future__ import annotations

import math
from typing import Any

from armlab.errors import ArmlabError
from armlab.report.complete import FinalValues
from armlab.runs import RUN_JSON, RunRecord, RunState, engine_differences, load_run
from armlab.seeds import planned_seeds
from armlab.spec import Experiment
from armlab.text import plural
from armlab.workdir import open_workdir


class NothingToCompare(ArmlabError):
    """Fewer than two arms have finished runs: `compare` refuses; `armlab run --arm A` is done."""


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
        if other_rung(exp, rec):
            continue  # a ladder's run at another depth: compared in its own rung
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
    diverged = [r for r in other if r.state_name == RunState.DIVERGED and r.arm in arms and r.run not in (exclude or [])]
    if diverged:
        # A diverged run is a result (this arm's data, this seed, this recipe blew up), not noise:
        # dropping it silently would report the arm as if it had trained fine.
        names = ", ".join(r.run for r in diverged)
        err = next((str((r.state or {}).get("error")) for r in diverged if (r.state or {}).get("error")), "")
        raise ArmlabError(
            f"{names}: diverged{' (' + err + ')' if err else ''}; compare will not average around it: retrain "
            f"with a lower learning rate, or leave it out with --exclude {diverged[0].run} (the report says so)"
        )
    return finished, other


def other_rung(exp: Experiment, rec: RunRecord) -> bool:
    """A run of the experiment's ladder at another depth than `exp`'s (each rung compares alone)."""
    depth = ((rec.info.get("comparability") or {}).get("model") or {}).get("depth")
    return bool(exp.ladder.depths) and depth != exp.model.depth and depth in exp.ladder.depths


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
    """Refuse runs of seeds the experiment does not plan (train.seeds, and the seeds `run
    --until-decided` recorded in the workdir): they are not part of its design."""
    planned = planned_seeds(exp)
    odd = [r for r in runs if r.seed not in planned[r.arm]]
    if odd:
        names = ", ".join(f"{r.run} (seed {r.seed})" for r in odd)
        raise ArmlabError(
            f"{names}: not in train.seeds {exp.train.seeds}; add the seed to train.seeds in the "
            f"experiment file, or leave the run out with --exclude {odd[0].run}"
        )


def check_finite(runs: list[RunRecord], final: list[FinalValues]) -> None:
    """A final val bpb or CORE that is NaN or infinite (a run whose loss blew up late, an
    evaluation that overflowed) is refused by name: it is not a number to average."""
    bad = [
        f"{r.run} ({m} {v})"
        for r, f in zip(runs, final, strict=True)
        for m, v in (("val bpb", f.val_bpb), ("CORE", f.core))
        if v is not None and not math.isfinite(v)
    ]
    if bad:
        first = bad[0].split(" ")[0]
        raise ArmlabError(
            f"{', '.join(bad)}: not a finite number, so the run diverged or its evaluation failed; retrain "
            f"it (`armlab rm` then `armlab run`), or leave it out with --exclude {first}"
        )


def check_eval_coverage(runs: list[RunRecord]) -> None:
    """Every run's val bpb must be one kind of measurement (report.evalcheck: whole documents vs a
    packed stream) over the same eval tokens (a sample is another measure): never mixed."""
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


