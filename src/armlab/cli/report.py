"""CLI commands for results: `armlab run`, `status`, `evaluate`, `compare`, `demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from armlab.cli.app import app, check_device, name_flag, split_ints, split_list

ExpArg = Annotated[Path, typer.Argument(help="experiment file (or a workdir holding experiment.toml)")]
# Options shared by `run` and `evaluate`
BundleOpt = Annotated[str | None, typer.Option(help="CORE bundle dir or URL (default: evaluate.core_bundle)")]
MaxPerTaskOpt = Annotated[int | None, typer.Option("--max-per-task", min=1, help="CORE items per task")]
DeviceOpt = Annotated[
    str | None, typer.Option(callback=check_device, help="cuda or cpu (default: cuda if available)")
]


@app.command()
def run(
    exp: ExpArg,
    arms: Annotated[
        list[str] | None,
        typer.Option("--arm", "--arms", callback=split_list, help="arm to run (repeatable, or a,b; default: all)"),
    ] = None,
    seeds: Annotated[
        list[str] | None,
        typer.Option("--seed", "--seeds", callback=split_ints, help="seed (repeatable, or 0,1; default: train.seeds)"),
    ] = None,
    device: DeviceOpt = None,
    num_gpus: Annotated[
        int | None, typer.Option("--num-gpus", min=1, help="GPUs per run (default: all; more GPUs: runs side by side)")
    ] = None,
    nproc: Annotated[int | None, typer.Option("--nproc", min=1, help="ranks per run with --device cpu")] = None,
    runs_at_once: Annotated[
        int | None,
        typer.Option("--runs-at-once", min=1, help="runs side by side (default: as many as the GPUs fit; CPU: 1)"),
    ] = None,
    bundle: BundleOpt = None,
    max_per_task: MaxPerTaskOpt = None,
    until_decided: Annotated[
        bool,
        typer.Option("--until-decided", help="then add seeds to the arms still within noise, until decided"),
    ] = False,
    max_seeds: Annotated[
        int | None,
        typer.Option("--max-seeds", min=2, help="with --until-decided: at most this many seeds per arm (default 8)"),
    ] = None,
) -> None:
    """Everything, locally: prepare -> tokenizer -> train every arm x seed -> evaluate -> compare.

    Runs train one after another, or side by side on disjoint GPU sets (--num-gpus per run).
    Complete steps are skipped and unfinished runs resumed, so rerunning after a crash continues.
    --until-decided: after the round of train.seeds, one more seed at a time for the arms whose
    difference still straddles 0, while --max-seeds seeds can still tell them apart."""
    from armlab.pipeline import run_experiment
    from armlab.spec import load_experiment

    if max_seeds is not None and not until_decided:
        from armlab.errors import ArmlabError

        raise ArmlabError("--max-seeds goes with --until-decided (armlab run EXP --until-decided --max-seeds N)")
    run_experiment(
        load_experiment(exp),
        arms=arms,
        seeds=seeds,
        device=device,
        num_gpus=num_gpus,
        bundle=bundle,
        max_per_task=max_per_task,
        nproc=nproc,
        runs_at_once=runs_at_once,
        max_seeds=(max_seeds or DEFAULT_MAX_SEEDS) if until_decided else None,
    )


DEFAULT_MAX_SEEDS = 8


@app.command()
def status(
    exp: ExpArg,
    watch: Annotated[bool, typer.Option("--watch", help="refresh until interrupted")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch", min=0.5)] = 5.0,
    stall_after: Annotated[
        float,
        typer.Option("--stall-after", help="STALLED after this many seconds without a logged step", min=1),
    ] = 600.0,
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object per run (every field, unrounded), then exit")
    ] = False,
) -> None:
    """One row per run: state (queued/running/done/failed/STALLED/dead), progress, loss, bpb, ETA, GPUs.

    A table fitted to the terminal; plain aligned lines when piped; JSON with --json."""
    from armlab.ops.status import show_status
    from armlab.spec import load_experiment

    if as_json and watch:
        raise typer.BadParameter("--json prints once; poll it instead of --watch", param_hint="'--json'")
    show_status(load_experiment(exp), stall_after_s=stall_after, watch=watch, interval=interval, as_json=as_json)


@app.command()
def rm(
    exp: ExpArg,
    arm: Annotated[str, typer.Option("--arm", help="the run's arm")],
    run: Annotated[str, typer.Option("--run", help="the run to delete, e.g. top-s0 (see `armlab status`)", callback=name_flag)],
    force: Annotated[
        bool, typer.Option("--force", help="delete an active run of another host that this one cannot check")
    ] = False,
) -> None:
    """Delete one run dir (checkpoints, metrics, eval); refuses a live run."""
    from armlab.ops.remove import remove_run
    from armlab.spec import load_experiment

    print(f"removed {remove_run(load_experiment(exp), arm, run, force=force)}")


@app.command()
def evaluate(
    exp: ExpArg,
    arm: Annotated[
        list[str] | None, typer.Option("--arm", callback=split_list, help="only this arm's runs (repeatable, or a,b)")
    ] = None,
    bundle: BundleOpt = None,
    max_per_task: MaxPerTaskOpt = None,
    device: DeviceOpt = None,
    force: Annotated[
        bool, typer.Option(help="re-evaluate runs that already have a matching eval.json")
    ] = False,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", min=1, help="score only the first N eval tokens (default: all)")
    ] = None,
) -> None:
    """Final val bpb on the shared eval set and CORE for every finished run -> <run>/eval.json."""
    from armlab.pipeline import evaluate_experiment
    from armlab.runs import EVAL_JSON
    from armlab.spec import load_experiment

    for d in evaluate_experiment(
        load_experiment(exp),
        arms=arm,
        bundle=bundle,
        max_per_task=max_per_task,
        device=device,
        force=force,
        max_tokens=max_tokens,
    ):
        print(d / EVAL_JSON)


@app.command()
def compare(
    exp: ExpArg,
    out: Annotated[Path | None, typer.Option(help="report dir (default: <workdir>/report)")] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option("--exclude", callback=split_list, help="leave this run out (repeatable, or a,b), e.g. a smoke test"),
    ] = None,
) -> None:
    """Compare the finished runs: verdict, differences with 95% intervals (seed + eval-item noise), what differs in
    the data, plots; writes report.md/.html and summary.json."""
    from armlab.report.compare import compare as run_compare
    from armlab.report.compare import print_verdict
    from armlab.spec import load_experiment

    report_dir, summary = run_compare(load_experiment(exp), out, exclude=exclude)
    print_verdict(summary)
    print(f"report: {report_dir / 'report.md'}")


@app.command()
def demo(
    workdir: Annotated[
        Path | None, typer.Option(help="where the demo lives (default: ~/.cache/armlab/armlab-demo)")
    ] = None,
    device: Annotated[
        str, typer.Option(callback=check_device, help="cpu (the demo's default) or cuda")
    ] = "cpu",
    num_iterations: Annotated[
        int,
        typer.Option(
            "--num-iterations",
            min=1,
            help="training steps per run (fewer: quicker, noisier; use a fresh --workdir)",
        ),
    ] = 120,
) -> None:
    """The whole experiment on a laptop CPU in a few minutes, no network: stdlib docs + junk, top vs random."""
    from armlab.demo import run_demo

    run_demo(workdir, device=device, num_iterations=num_iterations)
