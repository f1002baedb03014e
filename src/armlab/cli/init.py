"""CLI command that starts an experiment: `armlab init`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from armlab.cli.app import app


@app.command()
def init(
    exp: Annotated[Path, typer.Argument(help="experiment file to write (never overwritten)")] = Path(
        "experiment.toml"
    ),
    from_: Annotated[
        str | None,
        typer.Option(
            "--from", help="pool to read the columns from: hf://datasets/<repo>/<glob>, a dir, files or a glob"
        ),
    ] = None,
    cpu: Annotated[
        bool | None,
        typer.Option(
            "--cpu/--gpu",
            help="a pilot sized to run on this machine's CPU as it is, or the GPU template (default: CPU when no GPU is visible)",
        ),
    ] = None,
) -> None:
    """Write a commented experiment file, with text / id / score / token-count columns read off the pool."""
    from armlab.pilot import MAX_PER_TASK
    from armlab.scaffold import init_experiment

    pilot = init_experiment(exp, from_, cpu=cpu)
    print(exp)
    if pilot is None:
        print(f"next: edit it, then `armlab plan {exp}`")
        return
    why = "no GPU is visible here, so " if cpu is None else ""
    core = "CORE off: " if pilot.core_bundle == "none" else f"CORE on {MAX_PER_TASK} items a task: "
    print(f"{why}it is a CPU-sized pilot that runs here as it is (`armlab init --gpu` writes the GPU template); "
          f"{core}{pilot.core_reason}")  # fmt: skip
    print(f"next: `armlab plan {exp}` (with this CPU's time), then `armlab run {exp}`")
