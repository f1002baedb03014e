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

from armlab.errors import ArmlabError, RunFailed, Stopped
from armlab.ops.schedule import Slot
from armlab.progress import console
from armlab.runs import RUN_JSON, RunState, load_run, read_state
from armlab.spec import Experiment, HostSpec
from armlab.text import plural
from armlab.workdir import Workdir, open_workdir, run_name

if TYPE_CHECKING:
    from armlab.evaluate.record import EvalResult


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _select(exp: Experiment, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
    names = [exp.arm(a).name for a in arms] if arms else [a.name for a in exp.arms]
    return names, list(seeds) if seeds else list(exp.train.seeds)


def check_runs_match(exp: Experiment, arms: list[str], seeds: list[int]) -> None:
    """Refuse, before any work, when a run this command would skip as done (or resume) was trained
    under another spec: `demo --num-iterations 5` over 120-step runs would call them "already done",
    and `compare` would then refuse every one of them."""
    wd = open_workdir(exp, create=False)
    want = exp.comparability()
    odd = []
    for arm in arms:
        for seed in seeds:
            d = wd.run_dir(arm, run_name(arm, seed))
            if (d / RUN_JSON).is_file() and (keys := load_run(d).spec_differences(want)):
                odd.append(f"{d.name} (differs in {', '.join(keys)})")
    if odd:
        one = len(odd) == 1
        raise ArmlabError(
            f"{wd.root}: {plural(len(odd), 'run')} here {'was' if one else 'were'} trained under another "
            f"spec: {'; '.join(odd)}; use a fresh workdir, or delete {'it' if one else 'them'} "
            f"(`armlab rm {wd.root} --arm A --run R`) to train again"
        )


def local_machine(
    exp: Experiment,
    arms: list[str],
    device: str | None = None,
    num_gpus: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
) -> HostSpec:
    """This machine as the one host of `armlab run` (armlab.ops.schedule.local_host): runs of
    `num_gpus` GPUs each (default: all visible), as many side by side as fit; on CPU, runs of
    `nproc` processes, `runs_at_once` side by side."""
    import torch

    from armlab.ops.schedule import local_host

    if device not in (None, "cpu", "cuda"):
        raise ArmlabError(f"--device {device!r}: use cpu or cuda")
    device = device or ("cuda" if num_gpus is not None or torch.cuda.is_available() else "cpu")
    visible = torch.cuda.device_count() if device == "cuda" else 0
    return local_host(exp, arms, device=device, visible_gpus=visible, gpus_per_run=num_gpus, nproc=nproc,
                      runs_at_once=runs_at_once)  # fmt: skip


def train_runs(
    exp: Experiment,
    arms: list[str],
    seeds: list[int],
    device: str | None = None,
    num_gpus: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
) -> tuple[list[Path], list[str]]:
    """Train every arm x seed not yet done on this machine's lanes; returns (finished run dirs,
    failure messages). One lane trains here, in this process, with the ranks' output on the
    terminal; several train side by side, one runner process each (armlab.ops.lanes), with a line
    here when a run starts or fails. A stop (Ctrl-C, SIGTERM) stops every lane: Stopped. Callers
    run `check_runs_match` first, before their own expensive steps (prepare, the CORE bundle)."""
    from armlab.ops.lane_runner import run_lane
    from armlab.ops.lanes import LaneFiles, LaneState, queue_lane, read_lane_state
    from armlab.ops.schedule import group_lanes, plan_schedule

    schedule = plan_schedule(exp, [local_machine(exp, arms, device, num_gpus, nproc, runs_at_once)])
    slots = schedule.select(seeds=seeds)
    lanes = group_lanes(slots)
    wd = open_workdir(exp, create=False)
    if not slots:
        return [], []
    console.print(
        f"run: {plural(len(slots), 'run')} on {plural(len(lanes), 'lane')} of "
        f"{plural(slots[0].world_size, slots[0].device + ' rank')}"
    )
    for s in slots:
        if read_state(wd.run_dir(s.arm, s.run)).get("state") == RunState.DONE:
            console.print(f"run: {s.run} already done")
    if len(lanes) == 1:
        run_lane(queue_lane(wd, exp, lanes[0]).queue, echo=True)
        failures: list[str] = []
    else:
        failures = _side_by_side(wd, exp, lanes)
    done = []
    for lane in lanes:
        st = read_lane_state(LaneFiles.of(wd.root, lane[0]))
        if st.get("state") == LaneState.STOPPED:
            raise Stopped("armlab run stopped; rerun it to resume the stopped runs")
        failures += list((st.get("failures") or {}).values())
        done += [
            d for d in (wd.run_dir(s.arm, s.run) for s in lane) if read_state(d).get("state") == RunState.DONE
        ]
    return done, failures


def _side_by_side(wd: Workdir, exp: Experiment, lanes: list[list[Slot]]) -> list[str]:
    """Each lane in its own runner process (children of this one: they die with it), a line here
    when a lane starts a run; returns notes on lanes another process already trains. A signal
    stops every runner, each stopping its run resumably, and raises Stopped."""
    import time

    from armlab.ops.lane_runner import LaneStopped, stop_on_signals
    from armlab.ops.lanes import read_lanes, start_lanes
    from armlab.runs import stop_process

    starts = start_lanes(wd, exp, lanes, detach=False, wait_s=0)
    notes = [f"lane {s.lane} is trained by pid {s.pid} (another armlab run); not waited for"
             for s in starts if s.action == "running"]  # fmt: skip
    procs = {s.lane: s.proc for s in starts if s.proc is not None}
    shown: dict[str, tuple[str, str] | None] = {}
    try:
        with stop_on_signals():
            while any(p.poll() is None for p in procs.values()):
                for view in read_lanes(wd.root):
                    if view.id in procs and view.current and shown.get(view.id) != view.current:
                        console.print(f"run: lane {view.id} training {view.current[1]}")
                    shown[view.id] = view.current
                time.sleep(1)
    except (LaneStopped, KeyboardInterrupt):
        for p in procs.values():
            if p.poll() is None:
                stop_process(p.pid, 60)  # SIGTERM (Ctrl-C sent them SIGINT already), SIGKILL after 60 s
            p.wait()
        raise Stopped("armlab run stopped; rerun it to resume the stopped runs") from None
    return notes


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

    result, reused = evaluate_one(exp, run_dir, bundle, max_per_task, device or default_device(), force, max_tokens)
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
        evaluate_run(exp, d, opened, per_task, device, force, max_tokens)
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
) -> Path:
    """Everything, locally; returns the report dir. Raises RunFailed after the others if a run failed.

    Every selected arm x seed trains on this machine's lanes (`train_runs`); a schedule that
    cannot work (--num-gpus 2 on a CPU-only host, a batch the ranks cannot split) is refused
    before any work."""
    from armlab.data.prepare import prepare
    from armlab.ops.schedule import plan_schedule
    from armlab.report.compare import compare, print_verdict
    from armlab.tokenizer import train_experiment_tokenizer

    names, seed_list = _select(exp, arms, seeds)
    unknown = sorted(set(seed_list) - set(exp.train.seeds))
    if unknown:
        raise ArmlabError(
            f"--seeds {','.join(map(str, unknown))}: not in train.seeds {exp.train.seeds}; add them there first"
        )
    plan_schedule(exp, [local_machine(exp, names, device, num_gpus, nproc, runs_at_once)])
    check_runs_match(exp, names, seed_list)
    # The CORE bundle first: a bundle that cannot be fetched (offline, say) is refused before hours
    # of training, not after them.
    opened = open_bundle(exp, bundle)
    prepare(exp, arms=names)
    train_experiment_tokenizer(exp)
    done, failures = train_runs(exp, names, seed_list, device, num_gpus, nproc, runs_at_once)
    if done:
        for d in done:
            evaluate_run(exp, d, opened, max_per_task or exp.evaluate.max_per_task, device)
        out, summary = compare(exp)
        print_verdict(summary)
        console.print(f"report: {out / 'report.md'} (and report.html, summary.json)")
    if failures:
        raise RunFailed(f"{plural(len(failures), 'run')} failed: " + "; ".join(failures))
    return open_workdir(exp, create=False).report_dir
