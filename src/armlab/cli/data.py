"""CLI commands for data: `armlab prepare`, `armlab check`, `armlab plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from armlab.cli.app import app, check_device, check_executor, split_list, with_typed_exp
from armlab.errors import ArmlabError
from armlab.text import plural

# prepare's and score's: where the units run
ExecutorOption = Annotated[
    str | None,
    typer.Option(callback=check_executor, help="local | ray: where the units run (default: prepare.executor, else local)"),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="--executor ray: the head's host:port (default: prepare.ray_address, else RAY_ADDRESS, else auto)"),
]


@app.command()
def prepare(
    exp: Annotated[Path, typer.Argument(help="experiment file (or a workdir holding experiment.toml)")],
    arm: Annotated[
        list[str] | None,
        typer.Option("--arm", callback=split_list, help="arm to prepare (repeatable, or a,b; default: all)"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="units at once (default: prepare.workers, else the CPUs)", min=1)
    ] = None,
    executor: ExecutorOption = None,
    ray_address: RayAddressOption = None,
    force: Annotated[bool, typer.Option("--force", help="take over a data dir whose lease holder is dead")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace arms prepared from a different spec")] = False,
    skip_bad_files: Annotated[
        bool, typer.Option("--skip-bad-files", help="skip unreadable pool files (recorded in the manifests)")
    ] = False,
    keep_cache: Annotated[
        bool, typer.Option("--keep-cache", help="keep downloaded pool files in <workdir>/cache")
    ] = False,
    skip_download: Annotated[
        bool, typer.Option("--skip-download", help="prebuilt az:// arms: use what is already downloaded")
    ] = False,
    ratio: Annotated[float | None, typer.Option(help="override the --arm's ratio")] = None,
    seed: Annotated[int | None, typer.Option(help="override the --arm's seed")] = None,
    rows_per_shard: Annotated[int | None, typer.Option(help="override shards.rows_per_shard")] = None,
    scores_dir: Annotated[
        Path | None, typer.Option("--scores-dir", help="where `armlab score` wrote the scores (override score.scores_dir)")
    ] = None,
) -> None:
    """Prepare the eval set, the tokenizer sample and the arms' shuffled shards (resumable)."""
    from armlab.data.prepare import PrepareOptions
    from armlab.data.prepare import prepare as run_prepare
    from armlab.spec import load_experiment, with_overrides

    if (ratio is not None or seed is not None) and (not arm or len(arm) != 1):
        raise ArmlabError("--ratio / --seed apply to one arm: name it with a single --arm")
    one = arm[0] if arm else ""
    overrides = {
        f"arms.{one}.ratio": ratio,
        f"arms.{one}.seed": seed,
        "shards.rows_per_shard": rows_per_shard,
        "score.scores_dir": str(scores_dir) if scores_dir else None,
    }
    spec = with_overrides(load_experiment(exp), overrides)
    options = PrepareOptions(
        workers=workers,
        executor=executor,
        ray_address=ray_address,
        force=force,
        overwrite=overwrite,
        skip_bad_files=skip_bad_files,
        keep_cache=keep_cache,
        skip_download=skip_download,
    )
    dirs = run_prepare(spec, arms=arm, options=options)
    for name, d in dirs.items():
        print(f"{name}\t{d}")


@app.command()
def score(
    exp: Annotated[Path, typer.Argument(help="experiment file (or a workdir holding experiment.toml)")],
    scorer: Annotated[
        list[str] | None,
        typer.Option("--scorer", callback=split_list, help="scorer to run (repeatable, or a,b; default: all)"),
    ] = None,
    scores_dir: Annotated[
        Path | None,
        typer.Option("--scores-dir", help="where the scores go (override score.scores_dir; default <workdir>/scores)"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="worker processes (default: one per core; hf on CUDA: one per GPU)", min=1)
    ] = None,
    device: Annotated[
        str | None, typer.Option(callback=check_device, help="hf scorers: cpu or cuda (default: cuda when there is a GPU)")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="replace scores of another model or settings")
    ] = False,
    keep_cache: Annotated[
        bool, typer.Option("--keep-cache", help="keep downloaded pool files")
    ] = False,
    executor: ExecutorOption = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Score every pool document with the experiment's scorers (fastText, hf classifiers, heads over embeddings; resumable)."""
    from armlab.data.score.run import ScoreOptions
    from armlab.data.score.run import score as run_score
    from armlab.spec import load_experiment, with_overrides

    spec = with_overrides(load_experiment(exp), {"score.scores_dir": str(scores_dir) if scores_dir else None})
    options = ScoreOptions(
        workers=workers, device=device, overwrite=overwrite, keep_cache=keep_cache,
        executor=executor, ray_address=ray_address,
    )  # fmt: skip
    for name, d in run_score(spec, names=scorer, options=options).items():
        print(f"{name}\t{d}")


@app.command()
def check(
    data_dir: Annotated[
        Path, typer.Argument(help="a shard dir (an arm's data dir, the eval dir, or foreign shards)")
    ],
    world_size: Annotated[int | None, typer.Option(help="ranks that must be fed evenly", min=1)] = None,
    no_hashes: Annotated[bool, typer.Option("--no-hashes", help="skip sha256 verification")] = False,
) -> None:
    """Validate a shard dir: schema, non-empty texts, row groups vs world size, manifest hashes."""
    from armlab.data.check import check_data_dir

    res = check_data_dir(data_dir, world_size=world_size, verify_hashes=not no_hashes)
    counts = (plural(res.files, "file"), plural(res.rows, "row"), plural(res.row_groups, "row group"))
    print(f"{data_dir}: {', '.join(counts)}")
    if not res.ok:
        # the first problem is the error line (stderr); the others are listed once, here
        for p in res.problems[1:]:
            print(f"  also: {p}")
        more = f" (and {plural(len(res.problems) - 1, 'more problem')} above)" if len(res.problems) > 1 else ""
        raise ArmlabError(f"{res.problems[0]}{more}; fix: {res.fix}")
    print("ok")


@app.command()
def plan(
    exp: Annotated[Path, typer.Argument(help="experiment file (or its workdir)")],
    detect: Annotated[
        float | None,
        typer.Option(
            "--detect", min=0, help="seeds per arm needed to detect this difference (CORE / val bpb units)"
        ),
    ] = None,
    pilot: Annotated[
        Path | None,
        typer.Option(
            "--pilot",
            help="experiment file or workdir whose finished runs measure the noise (default: EXP's own)",
        ),
    ] = None,
    mfu: Annotated[
        list[str] | None,
        typer.Option(
            "--mfu", callback=split_list, help="assumed MFU, e.g. 0.45 or H100=0.45 (repeatable, or a,b; default 0.4)"
        ),
    ] = None,
    gpus: Annotated[
        int | None, typer.Option("--gpus", min=1, help="GPUs per run (default: the hosts', else 8)")
    ] = None,
    usd_per_gpu_hour: Annotated[
        float,
        typer.Option("--usd-per-gpu-hour", min=0, help="price of one GPU-hour (nanochat's README: ~$3)"),
    ] = 3.0,
    link_mbps: Annotated[
        float,
        typer.Option(
            "--link-mbps", help="remote pools: link speed for the download estimate, Mbit/s", min=0.001
        ),
    ] = 1000.0,
    cpu_probe: Annotated[
        bool | None,
        typer.Option(
            "--cpu-probe/--no-cpu-probe",
            help="time a few training steps on this CPU (default: when the model is small enough to take a moment)",
        ),
    ] = None,
) -> None:
    """Per arm: docs / chars / tokens vs what one run consumes; FLOPs, GPU-hours, wall time and cost per run and
    for the experiment; a remote pool's download; scoring's docs/s and CPU/GPU-hours (a probe of each scorer here);
    the smallest difference its seeds can detect (from a pilot's noise)."""
    from rich.markup import escape

    from armlab.cost import costs, parse_mfu, render_costs, render_ladder
    from armlab.data.plan import download_plan, render, render_download
    from armlab.data.plan import plan as make_plan
    from armlab.plan_checks import check_plan, gpus_to_price, plan_budget
    from armlab.progress import console
    from armlab.report.power import plan_power
    from armlab.spec import load_experiment
    from armlab.train.probe import cpu_estimate

    spec = load_experiment(exp)
    mfus = parse_mfu(mfu)
    pilot_exp = load_experiment(pilot) if pilot else None
    budget, vocab, source = plan_budget(spec)  # the trained tokenizer's vocabulary once it exists
    checked = check_plan(spec, budget, gpus)  # refuses what train / launch would refuse
    priced = render_costs(spec, costs(spec, mfus, gpus_to_price(spec, budget, gpus), budget), usd_per_gpu_hour, budget)
    if spec.ladder.depths:
        priced += "\n" + render_ladder(spec, mfus, gpus)
    noise = plan_power(spec, pilot_exp, detect)
    plans = make_plan(spec, budget)  # reads the pool's metadata for unprepared arms
    table, warnings = render(spec, plans, budget, (vocab, source))
    cpu = cpu_estimate(spec, budget, vocab, cpu_probe)  # a few real training steps on this CPU, timed
    print(f"{table}\n{priced}\n{cpu}\n{noise}", flush=True)
    warnings = checked + warnings
    if any(p.source == "estimate" for p in plans) and (download := download_plan(spec)):
        print(render_download(download, link_mbps))
    if spec.scorers:  # each scorer's model, timed on the first pool documents here
        from armlab.data.score.probe import render_scoring, scoring_plan

        print(render_scoring(scoring_plan(spec)))
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(with_typed_exp(w))}", soft_wrap=True)
