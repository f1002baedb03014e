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
) -> None:
    """Write a commented experiment file, with text / id / score / token-count columns read off the pool."""
    from armlab.scaffold import init_experiment

    path = init_experiment(exp, from_)
    print(path)
    print(f"next: edit it, then `armlab plan {path}`")
