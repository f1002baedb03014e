"""`armlab run` and `armlab evaluate`: the whole experiment, locally, skipping what is complete.

    prepare (every arm, eval set, tokenizer sample) -> tokenizer -> train every arm x seed
    -> evaluate every finished run (val bpb + CORE) -> compare (report)

Each step is idempotent, so a rerun after a crash continues where it stopped: prepare and the
tokenizer skip complete outputs themselves; a run whose state.json says done is skipped, any
other existing run is resumed from its last checkpoint (`train(..., resume=True)`); a run whose
eval.json matches its checkpoint and bundle is not evaluated again. A failed run does not stop
the others; the failures are reported together at the end (exit 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from armlab.errors import ArmlabError, RunFailed
from armlab.progress import console
from armlab.runs import RUN_JSON, RunState, load_run
from armlab.spec import Experiment
from armlab.text import plural
from armlab.workdir import open_workdir

if TYPE_CHECKING:
    from armlab.evaluate.record import EvalResult


def _select(exp: Experiment, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
    """The arms and seeds to run: the named ones, else every arm and every planned seed
    (train.seeds and those `--until-decided` added: `armlab.seeds`)."""
    from armlab.seeds import planned_seeds

    names = [exp.arm(a).name for a in arms] if arms else [a.name for a in exp.arms]
    planned = list(dict.fromkeys(s for a in names for s in planned_seeds(exp)[a]))
    return names, list(seeds) if seeds else planned


def check_runs_match(exp: Experiment, arms: list[str], seeds: list[int]) -> None:
    """Refuse, before any work, when a run this command would skip as done (or resume) was trained
    under another spec: `demo --num-iterations 5` over 120-step runs would call them "already done",
    and `compare` would then refuse every one of them."""
    wd = open_workdir(exp, create=False)
    want = exp.comparability()
    odd = []
    for arm in arms:
        for seed in seeds:
            d = wd.run_dir(arm, exp.run_name(arm, seed))
            if (d / RUN_JSON).is_file() and (keys := load_run(d).spec_differences(want)):
                odd.append(f"{d.name} (differs in {', '.join(keys)})")
    if odd:
        one = len(odd) == 1
        raise ArmlabError(
            f"{wd.root}: {plural(len(odd), 'run')} here {'was' if one else 'were'} trained under another "
            f"spec: {'; '.join(odd)}; use a fresh workdir, or delete {'it' if one else 'them'} "
            f"(`armlab rm {wd.root} --arm A --run R`) to train again"
        )


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def evaluate_run(
    exp: Experiment,
    run_dir: Path,
    bundle: Any = None,
    max_per_task: int | None = None,
    device: str | None = None,
    force: bool = False,
    max_tokens: int | None = None,
) -> EvalResult:
    """The run's last k checkpoints scored by armlab (whole-document val bpb over the shared eval
    set, or a seeded sample of max_tokens; CORE when a bundle is given) -> <run>/eval.json
    (armlab.evaluate.run); an eval.json that still matches is reused."""
    from armlab.evaluate.run import evaluate_run as evaluate_one
    from armlab.evaluate.run import summary_line

    device = device or ("cuda" if torch_cuda() else "cpu")
    result, reused = evaluate_one(exp, run_dir, bundle, max_per_task, device, force, max_tokens)
    if not reused:
        console.print(f"evaluate: {result.run}: {summary_line(result)}")
    return result


def open_bundle(exp: Experiment, source: str | None = None) -> Any:
    """The experiment's CORE bundle (--bundle overrides evaluate.core_bundle); None when neither is set."""
    from armlab.evaluate.bundle import load_bundle

    source = source or exp.evaluate.bundle
    if not source or source.lower() == "none":
        console.print("evaluate: CORE off (evaluate.core_bundle / --bundle is \"none\"); val bpb only")
        return None
    return load_bundle(
        source, sha256=exp.evaluate.core_bundle_sha256 if source == exp.evaluate.core_bundle else None
    )


def evaluate_experiment(
    exp: Experiment,
    arms: list[str] | None = None,
    bundle: str | None = None,
    max_per_task: int | None = None,
    device: str | None = None,
    force: bool = False,
    max_tokens: int | None = None,
) -> list[Path]:
    """Evaluate every finished run of the selected arms; returns their run dirs."""
    names, _ = _select(exp, arms, None)
    wd = open_workdir(exp, create=False)
    runs = [
        r.dir for r in map(load_run, wd.all_run_dirs()) if r.arm in names and r.state_name == RunState.DONE
    ]
    if not runs:
        raise ArmlabError(
            f"experiment {exp.name!r} has no finished runs{' of ' + ', '.join(arms) if arms else ''} to "
            "evaluate; `armlab status EXP` shows where they are"
        )
    opened = open_bundle(exp, bundle)
    per_task = max_per_task or exp.evaluate.max_per_task
    for d in runs:
        evaluate_run(rung_of(exp, d), d, opened, per_task, device, force, max_tokens)
    return runs


def run_experiment(
    exp: Experiment,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    device: str | None = None,
    num_gpus: int | None = None,
    bundle: str | None = None,
    max_per_task: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
    max_seeds: int | None = None,
) -> Path:
    """Everything, locally; returns the report dir. Raises RunFailed after the others if a run failed.

    Every selected arm x seed (x depth of a `[ladder]`) trains on this machine's lanes
    (armlab.ops.orchestrator: this machine is the one host); a layout that cannot work
    (--num-gpus 2 on a CPU-only host, a batch the ranks cannot split) is refused before any work.
    With `max_seeds` (`--until-decided --max-seeds N`), seeds are then added to the arms the runs
    cannot yet tell apart, until decided or until N seeds could not (`armlab.decide`)."""
    from armlab.ops.orchestrator import local_host, run_here

    names, seed_list = _select(exp, arms, seeds)
    unknown = sorted(set(seed_list) - set(_select(exp, arms, None)[1]))
    if unknown:
        raise ArmlabError(
            f"--seeds {','.join(map(str, unknown))}: not in train.seeds {exp.train.seeds}; add them there first"
        )
    if max_seeds is not None and (arms or seeds or exp.ladder.depths):
        raise ArmlabError(
            "--until-decided decides between every arm at one depth over the seeds it adds: leave out --arm, "
            "--seed (and [ladder])"
        )
    rungs = [(rung, local_host(rung, names, device, num_gpus, nproc, runs_at_once)) for rung in exp.rungs()]
    for rung, _ in rungs:  # the experiment, or each depth of its ladder
        check_runs_match(rung, names, seed_list)
    # The CORE bundle first: a bundle that cannot be fetched (offline, say) is refused before hours
    # of training, not after them.
    opened = open_bundle(exp, bundle)
    failures: list[str] = []

    def train(arms: list[str], seeds: list[int]) -> bool:
        """Train and evaluate these runs at every depth; True when any run is done."""
        done = []
        for rung, host in rungs:
            if exp.ladder.depths:
                console.print(f"run: ladder depth {rung.model.depth}")
            finished, failed = run_here(rung, host, seeds, arms)
            failures.extend(failed)
            for d in finished:
                evaluate_run(rung, d, opened, max_per_task or exp.evaluate.max_per_task, device)
            done += finished
        return bool(done)

    done = train(names, seed_list)
    if max_seeds is not None and done and not failures:
        from armlab.decide import run_until_decided

        def train_round(add: dict[str, int]) -> Any:
            train(list(add), sorted(set(add.values())))
            return None if failures else report(exp, quiet=True)

        if run_until_decided(exp, max_seeds, report(exp, quiet=True), train_round, console.print) is not None:
            report(exp)  # the final report: its intervals at the loop's level, its rounds in the notes
    elif done:
        report(exp, quiet=False, failures=bool(failures))
    if failures:
        raise RunFailed(f"{plural(len(failures), 'run')} failed: " + "; ".join(failures))
    return open_workdir(exp, create=False).report_dir


def report(exp: Experiment, quiet: bool = False, failures: bool = False) -> Any:
    """Compare the finished runs and print the verdict (`quiet`: not); returns the summary, or
    None when fewer than two arms have finished runs: a run of one arm (`armlab run EXP --arm A`)
    is a success with nothing to compare yet, not a refusal. With `failures` (some runs failed),
    a refusal is said and the failures raised after it explain it."""
    from armlab.report.compare import NothingToCompare, analyse, compare, print_verdict

    try:
        if quiet:
            return analyse(exp)[0]
        out, summary = compare(exp)
    except NothingToCompare as e:
        console.print(f"run: {e}")
        return None
    except ArmlabError as e:
        if not failures:
            raise
        console.print(f"compare: {e}")  # the failed runs are why
        return None
    print_verdict(summary)
    console.print(f"report: {out / 'report.md'} (and report.html, summary.json)")
    return summary


def rung_of(exp: Experiment, run_dir: Path) -> Experiment:
    """The experiment a run was trained as: its ladder rung (the depth in its run.json), else `exp`."""
    if not exp.ladder.depths:
        return exp
    depth = ((load_run(run_dir).info.get("comparability") or {}).get("model") or {}).get("depth")
    return exp.at_depth(depth) if depth in exp.ladder.depths else exp
