"""CLI commands for running arms on SSH hosts: setup, doctor, launch, logs, stop.

Each command is a few lines over `armlab.ops`; heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path

import typer

from armlab.cli.app import app, check_device, name_flag, split_ints, split_list, with_typed_exp


def _exp_or_target(value: str):  # -> (Experiment | None, str)
    """`armlab setup` takes an experiment file/workdir or a bare SSH target."""
    from armlab.spec import load_experiment

    p = Path(value).expanduser()
    if p.is_file() or (p.is_dir() and (p / "experiment.toml").is_file()):
        return load_experiment(p), value
    if value.endswith(".toml"):
        load_experiment(p)  # raises: experiment file not found
    return None, value


@app.command()
def setup(
    target: str = typer.Argument(
        ..., help="experiment file (sets up its \\[\\[hosts]]) or an SSH target (user@host or alias)"
    ),
    host: list[str] = typer.Option(
        None, "--host", callback=split_list, help="only this \\[\\[hosts]] entry, by name (repeatable, or a,b)"
    ),
    system_site_packages: bool = typer.Option(
        False, "--system-site-packages", help="let the venv see the host's packages (reuse its CUDA torch)"
    ),
    extras: list[str] = typer.Option(
        None, "--extra", "--extras", callback=split_list, help="armlab extra to install (repeatable, or wandb,gpu)"
    ),
    no_deps: bool = typer.Option(
        False, "--no-deps", help="install armlab only; its dependencies are already there"
    ),
    python: str = typer.Option(
        None, "--python", help="interpreter armlab runs with on the host (default ~/.armlab/venv/bin/python)"
    ),
    base_python: str = typer.Option(
        "python3", "--base-python", help="host interpreter that creates the venv"
    ),
    wheel: Path = typer.Option(
        None, "--wheel", help="install this wheel instead of building one from the source checkout"
    ),
    force: bool = typer.Option(False, "--force", help="reinstall even when the host has this exact armlab"),
) -> None:
    """Bootstrap host(s): venv, this machine's armlab (wheel over SSH), report Python/torch/CUDA/GPUs."""
    from armlab.ops.hosts import host_python
    from armlab.ops.orchestrator import parallel, select_hosts
    from armlab.ops.setup import setup_host
    from armlab.ops.ssh import DEFAULT_REMOTE_PYTHON, Remote

    exp, tgt = _exp_or_target(target)
    # Two rounds: node 0 of every entry, then the other nodes of multi-node entries, whose venv is
    # often node 0's own on a shared home (found up to date then, never installed twice at once).
    rounds: list[list] = [[], []]
    if exp is not None:
        for h in select_hosts(exp, host):
            if h.target is None:  # a Slurm login node armlab runs on: this armlab is its armlab
                print(f"{h.name}: runs on this machine (a Slurm login node): nothing to set up")
            for k, node in enumerate(h.nodes or ([h.target] if h.target else [])):
                rounds[min(k, 1)].append((Remote(name=h.name, target=node, port=h.port), python or host_python(h)))
    else:
        rounds[0] = [(Remote(name=tgt, target=tgt), python or DEFAULT_REMOTE_PYTHON)]
    kw = dict(base_python=base_python, system_site_packages=system_site_packages, no_deps=no_deps, force=force,
              extras=tuple(extras or ()), wheel=wheel)  # fmt: skip
    for targets in rounds:
        for r in parallel(lambda t: setup_host(t[0], python=t[1], **kw), targets):
            print(r.line())


@app.command()
def doctor(
    exp: Path = typer.Argument(
        None, help="experiment file (or its workdir); without it, checks this machine only"
    ),
    host: list[str] = typer.Option(
        None, "--host", callback=split_list, help="check this \\[\\[hosts]] entry over SSH (repeatable, or a,b; default: all)"
    ),
    local: bool = typer.Option(
        False, "--local", help="check this machine even when the experiment has \\[\\[hosts]]"
    ),
    arm: list[str] = typer.Option(None, "--arm", callback=split_list, help="only this arm (repeatable, or a,b; local checks)"),
    device: str = typer.Option(
        None, "--device", callback=check_device, help="cuda or cpu (what the runs will use)"
    ),
    num_gpus: int = typer.Option(None, "--num-gpus", min=1, help="GPUs each run will use (local checks)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes per run with --device cpu"),
    master_port: int = typer.Option(
        None, "--master-port", min=1, max=65535, help="torchrun port that must be free (local checks)"
    ),
    script: list[Path] = typer.Option(
        None, "--script", help="shell script to check for Windows line endings (repeatable)"
    ),
    nanochat: Path = typer.Option(
        None,
        "--nanochat",
        help="a nanochat checkout to check: python + torch, base_train --help, commit, GPUs, TF32 API clash",
    ),
    expect_data: bool = typer.Option(
        True, "--expect-data/--no-expect-data", help="arms must already be prepared"
    ),
    as_json: bool = typer.Option(
        False, "--json", help="print the report as JSON (what launch reads over SSH)"
    ),
    core_bundle: bool = typer.Option(
        True, "--core-bundle/--no-core-bundle", help="check the CORE eval bundle is cached or reachable"
    ),
) -> None:
    """Preflight checks, each ok / warn / fail with a one-line fix; exit 2 when any fails."""
    from armlab.ops.doctor import render, run_doctor
    from armlab.spec import load_experiment

    e = load_experiment(exp) if exp else None
    if e is not None and e.hosts and not local:
        from armlab.ops.doctor import DoctorReport, check_script
        from armlab.ops.orchestrator import doctor_hosts, hosts_of

        extra = ("--nanochat", str(nanochat)) if nanochat else ()
        reports = doctor_hosts(e, hosts_of(e, host), device=device, expect_data=expect_data, extra=extra)
        if script:
            here = DoctorReport(host="(this machine)", info={})
            for s in script:
                check_script(here, s)
            reports.append(here)
    else:
        reports = [run_doctor(e, arms=arm or None, device=device, num_gpus=num_gpus, nproc=nproc, master_port=master_port,
                              scripts=tuple(script or ()), nanochat=nanochat, expect_data=expect_data,
                              bundle=core_bundle)]  # fmt: skip
        for c in reports[0].checks:  # this machine's fixes name the experiment path as typed
            c.fix = with_typed_exp(c.fix)
    if as_json and len(reports) == 1:
        print(reports[0].to_json())
    elif as_json:
        import json

        print(json.dumps([json.loads(r.to_json()) for r in reports]))
    else:
        render(reports)
    if not all(r.ok for r in reports):
        raise typer.Exit(2)


@app.command()
def launch(
    exp: Path = typer.Argument(..., help="experiment file with \\[\\[hosts]]"),
    prepare_mode: str = typer.Option(
        "prepare",
        "--prepare-mode",
        help="prepare: prepare each arm on its host first; skip: the data must be there",
    ),
    device: str = typer.Option(
        None,
        "--device",
        callback=check_device,
        help="override every host's device (cpu: `--nproc` processes from \\[\\[hosts]] nproc)",
    ),
    seed: list[str] = typer.Option(
        None, "--seed", callback=split_ints, help="only this seed of train.seeds (repeatable, or 0,1; default: all)"
    ),
    host: list[str] = typer.Option(None, "--host", callback=split_list, help="only this \\[\\[hosts]] entry (repeatable, or a,b)"),
    until_decided: bool = typer.Option(
        False, "--until-decided", help="first look at the finished, evaluated round and add seeds to the arms still within noise"
    ),
    max_seeds: int = typer.Option(None, "--max-seeds", min=2, help="with --until-decided: at most this many seeds per arm (default 8)"),
) -> None:
    """Preflight every host, then train every arm x seed on its host's lanes, detached (survives SSH); rerun-safe.

    Prints one line per run: host, arm, run, what happened (started, queued, already running,
    already done, failed: why), pid of its lane's runner, run dir on the host, lane.
    --until-decided: once every planned run is done and evaluated here, compare them first and add
    a seed to the arms still within noise (as `armlab run --until-decided`, one look per launch)."""
    from armlab.cli.report import DEFAULT_MAX_SEEDS
    from armlab.errors import ArmlabError
    from armlab.ops.orchestrator import launch as launch_runs
    from armlab.progress import console
    from armlab.spec import load_experiment

    if max_seeds is not None and not until_decided:
        raise ArmlabError("--max-seeds goes with --until-decided (armlab launch EXP --until-decided --max-seeds N)")
    spec = load_experiment(exp)

    def start() -> list:
        return launch_runs(spec, prepare_mode=prepare_mode, device=device, seeds=seed or None, hosts=host)

    if until_decided:
        if seed or spec.ladder.depths:
            raise ArmlabError("--until-decided decides between every arm at one depth: leave out --seed (and [ladder])")
        from armlab.decide import launch_round

        records = launch_round(spec, max_seeds or DEFAULT_MAX_SEEDS, console.print, start)
    else:
        records = start()
    for r in records:
        print(f"{r.host}\t{r.arm}\t{r.run}\t{r.action}\tpid {r.pid or '-'}\t{r.run_dir}\t{r.lane}")
    if any(r.failed for r in records):
        raise typer.Exit(1)


@app.command()
def logs(
    exp: Path = typer.Argument(..., help="experiment file"),
    arm: str = typer.Option(..., "--arm", help="the arm whose train.log to show"),
    run: str = typer.Option(None, "--run", help="run name (default: the arm's latest run)", callback=name_flag),
    follow: bool = typer.Option(False, "-f", "--follow", help="keep streaming new lines (Ctrl-C to stop)"),
    lines: int = typer.Option(50, "-n", "--lines", help="how many last lines to show"),
    local: bool = typer.Option(
        False, "--local", help="read this machine's run even when the arm has a \\[\\[hosts]] entry"
    ),
) -> None:
    """Show an arm's train.log, over SSH when the arm runs on a host."""
    from armlab.ops import orchestrator
    from armlab.spec import load_experiment

    rc = orchestrator.logs(load_experiment(exp), arm, run=run, follow=follow, lines=lines, local=local)
    if rc:
        raise typer.Exit(rc)


@app.command()
def stop(
    exp: Path = typer.Argument(..., help="experiment file"),
    arm: list[str] = typer.Option(None, "--arm", callback=split_list, help="only this arm (repeatable, or a,b; default: all)"),
    timeout: float = typer.Option(
        None, "--timeout", help="seconds after SIGTERM before SIGKILL (default: the trainer's checkpoint grace + 60)"
    ),
    local: bool = typer.Option(
        False, "--local", help="stop runs on this machine even when the experiment has \\[\\[hosts]]"
    ),
) -> None:
    """Stop live runs cleanly: each run checkpoints, then exits (SIGKILL after --timeout); lease released.

    A lane stops whole: the lines also name its queued runs, which do not start (the next launch starts them)."""
    from armlab.ops import orchestrator
    from armlab.spec import load_experiment

    results = orchestrator.stop(load_experiment(exp), arms=arm or None, timeout=timeout, local=local)
    if not results:
        print("no live runs")
    for r in results:
        print(f"{r.host}\t{r.arm}\t{r.run}\tpid {r.pid or '-'}\t{r.result}")
