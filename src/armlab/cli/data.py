"""CLI commands for data: `armlab prepare`, `armlab check`, `armlab plan`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from armlab.cli.app import app, split_list, with_typed_exp
from armlab.errors import ArmlabError
from armlab.text import plural


@app.command()
def prepare(
    exp: Annotated[Path, typer.Argument(help="experiment file (or a workdir holding experiment.toml)")],
    arm: Annotated[
        list[str] | None,
        typer.Option("--arm", callback=split_list, help="arm to prepare (repeatable, or a,b; default: all)"),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes (default: CPU count)", min=1)] = None,
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
) -> None:
    """Prepare the eval set, the tokenizer sample and the arms' shuffled shards (resumable)."""
    from armlab.data.prepare import PrepareOptions
    from armlab.data.prepare import prepare as run_prepare
    from armlab.spec import load_experiment, parse_experiment

    spec = load_experiment(exp)
    if ratio is not None or seed is not None or rows_per_shard is not None:
        data = spec.model_dump(mode="json")
        if ratio is not None or seed is not None:
            if not arm or len(arm) != 1:
                raise ArmlabError("--ratio / --seed apply to one arm: name it with a single --arm")
            target = next((a for a in data["arms"] if a["name"] == arm[0]), None)
            if target is None:
                spec.arm(arm[0])  # raises the standard "no arm named" error
            if ratio is not None:
                target["ratio"] = ratio
            if seed is not None:
                target["seed"] = seed
        if rows_per_shard is not None:
            data["shards"]["rows_per_shard"] = rows_per_shard
        spec = parse_experiment(data, "command line")
    options = PrepareOptions(
        workers=workers,
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
def plan(exp: Annotated[Path, typer.Argument(help="experiment file (or its workdir)")]) -> None:
    """Per arm: docs / chars / tokens available vs tokens one run consumes, and epochs."""
    from rich.markup import escape

    from armlab.data.plan import plan as make_plan
    from armlab.data.plan import render
    from armlab.progress import console
    from armlab.spec import load_experiment

    spec = load_experiment(exp)
    table, warnings = render(spec, make_plan(spec))
    print(table)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {escape(with_typed_exp(w))}", soft_wrap=True)
