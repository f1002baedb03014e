"""CLI commands for blob storage: `armlab publish` and `armlab pull` (Azure, az://container/prefix).

What moves, and where (the playbook: a CPU node prepares, GPU nodes pull and train):

    armlab publish EXP --arm A --to az://c/exp/A       the arm's shards + manifest, at az://c/exp/A/
    armlab publish EXP --shared --to az://c/exp        eval set + tokenizer, at az://c/exp/_shared/
    armlab publish EXP --arm A --shared --to az://c/exp    both: the arm goes to az://c/exp/A/

`pull` takes the same flags with --from: with --shared, --from names the experiment prefix (the
shared assets are pulled first, so the arm is then checked against the eval set it excludes).
"""

from __future__ import annotations

from pathlib import Path

import typer

from armlab.cli.app import app
from armlab.errors import ArmlabError


def _uri(uri: str | None, container: str | None, prefix: str | None, flag: str) -> str | None:
    """`--to/--from az://c/p`, or the playbook's `--container c --prefix p`."""
    if uri and (container or prefix):
        raise ArmlabError(f"give either {flag} az://<container>/<prefix> or --container/--prefix, not both")
    if container:
        return f"az://{container}/{prefix or ''}"
    if prefix:
        raise ArmlabError("--prefix needs --container")
    return uri


def _what(arm: str | None, shared: bool, command: str) -> None:
    if arm is None and not shared:
        raise ArmlabError(f"{command}: give --arm A, --shared (eval set + tokenizer), or both")


@app.command()
def publish(
    exp: Path = typer.Argument(..., help="experiment file (or its workdir)"),
    arm: str | None = typer.Option(None, "--arm", help="arm whose prepared shards to upload"),
    shared: bool = typer.Option(
        False,
        "--shared",
        help="upload the eval set and tokenizer to <prefix>/_shared/ (with --arm: arm to <prefix>/<arm>/)",
    ),
    to: str | None = typer.Option(None, "--to", help="destination az://<container>/<prefix>"),
    container: str | None = typer.Option(None, "--container", help="destination container (instead of --to)"),
    prefix: str | None = typer.Option(None, "--prefix", help="destination prefix, with --container"),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="parallel uploads"),
    replace: bool = typer.Option(
        False, "--replace", help="delete blobs under the destination that are not what is published"
    ),
) -> None:
    """Upload an arm's shards and/or the shared eval set + tokenizer (manifest last, Content-MD5 set); resumable."""
    from armlab.data.blob import arm_uri, publish_shared
    from armlab.data.blob import publish as publish_arm
    from armlab.spec import load_experiment

    _what(arm, shared, "publish")
    uri = _uri(to, container, prefix, "--to")
    if uri is None:
        raise ArmlabError("publish: give --to az://<container>/<prefix> (or --container/--prefix)")
    experiment = load_experiment(exp)
    if shared:
        publish_shared(experiment, uri, concurrency=concurrency, replace=replace)
    if arm is not None:
        dest = arm_uri(uri, arm) if shared else uri
        publish_arm(experiment, arm, dest, concurrency=concurrency, replace=replace)


@app.command()
def pull(
    exp: Path = typer.Argument(..., help="experiment file (or its workdir)"),
    arm: str | None = typer.Option(None, "--arm", help="arm whose data dir receives the published shards"),
    shared: bool = typer.Option(
        False,
        "--shared",
        help="pull the eval set and tokenizer from <prefix>/_shared/ (with --arm: arm from <prefix>/<arm>/)",
    ),
    from_: str | None = typer.Option(
        None, "--from", help="published arm, or experiment prefix with --shared: az://<container>/<prefix>"
    ),
    container: str | None = typer.Option(None, "--container", help="source container (instead of --from)"),
    prefix: str | None = typer.Option(None, "--prefix", help="source prefix, with --container"),
    download_mode: str | None = typer.Option(
        None, "--download-mode", help="bulk | sequential (default: the arm's, else bulk)"
    ),
    concurrency: int | None = typer.Option(
        None, "--concurrency", min=1, help="parallel downloads (default: the arm's, else 8)"
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="take over a stale lease of a dead run; with --shared, replace a different eval set / tokenizer",
    ),
) -> None:
    """Download a published arm and/or the shared eval set + tokenizer (verified, manifest last)."""
    from armlab.data.blob import arm_uri, pull_shared
    from armlab.data.blob import pull as pull_arm
    from armlab.spec import load_experiment

    _what(arm, shared, "pull")
    uri = _uri(from_, container, prefix, "--from")
    experiment = load_experiment(exp)
    if shared:
        if uri is None:
            raise ArmlabError("pull --shared: give --from az://<container>/<experiment prefix>")
        pull_shared(experiment, uri, mode=download_mode or "bulk", concurrency=concurrency or 8, force=force)
    if arm is not None:
        src = arm_uri(uri, arm) if shared and uri else uri
        pull_arm(experiment, arm, src, mode=download_mode, concurrency=concurrency, force=force)
