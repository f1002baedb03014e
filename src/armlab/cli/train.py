"""CLI commands for train."""

from pathlib import Path

import typer

from armlab.cli.app import app, check_device, name_flag


# -- tokenizer (owner: tokenizer/loader engineer) ----------------------------------------------------
@app.command()
def tokenizer(
    exp: Path = typer.Argument(..., help="experiment file (or its workdir)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="retrain even if a tokenizer for another spec exists"
    ),
) -> None:
    """Train the experiment's shared BPE tokenizer on the pool sample written by `armlab prepare`."""
    from armlab.spec import load_experiment
    from armlab.tokenizer import train_experiment_tokenizer

    train_experiment_tokenizer(load_experiment(exp), overwrite=overwrite)


# -- end of tokenizer --------------------------------------------------------------------------------


# -- train (owner: trainer engineer) -----------------------------------------------------------------
@app.command()
def train(
    exp: Path = typer.Argument(..., help="experiment file (or its workdir)"),
    arm: str = typer.Option(..., "--arm", help="the arm to train"),
    seed: int | None = typer.Option(None, "--seed", help="training seed (default: the first of train.seeds)"),
    run_name: str | None = typer.Option(None, "--run-name", help="run dir name (default: <arm>-s<seed>)", callback=name_flag),
    num_gpus: int | None = typer.Option(
        None, "--num-gpus", min=1, help="CUDA ranks (checked against visible GPUs)"
    ),
    device: str | None = typer.Option(
        None, "--device", callback=check_device, help="cuda or cpu (default: cuda if available)"
    ),
    nproc: int | None = typer.Option(None, "--nproc", min=1, help="ranks for --device cpu (gloo)"),
    master_port: int | None = typer.Option(
        None, "--master-port", min=1, max=65535, help="torchrun port (default: a free one)"
    ),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="nodes of a multi-node run (run this command on each)"),
    node_rank: int | None = typer.Option(
        None, "--node-rank", min=0, help="this node's rank, 0..N-1 (default: $SLURM_NODEID); node 0 owns the run dir"
    ),
    rdzv_endpoint: str | None = typer.Option(
        None, "--rdzv-endpoint", help="HOST:PORT of node 0 where a multi-node run's nodes meet (static rendezvous)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue from the run's latest checkpoint"),
    detach: bool = typer.Option(
        False, "--detach", help="run in the background (survives SSH); prints the run dir"
    ),
    force: bool = typer.Option(False, "--force", help="start over an existing run / take over a stale lease"),
    engine: str | None = typer.Option(
        None, "--engine", help="override train.engine: builtin (armlab's trainer) or nanochat (your checkout)"
    ),
    nanochat: str | None = typer.Option(
        None,
        "--nanochat",
        help="train with this nanochat checkout (sets [nanochat] path; implies --engine nanochat)",
    ),
    depth: int | None = typer.Option(None, "--depth", help="override model.depth"),
    device_batch_size: int | None = typer.Option(
        None, "--device-batch-size", help="override train.device_batch_size"
    ),
    total_batch_size: int | None = typer.Option(
        None, "--total-batch-size", help="override train.total_batch_size"
    ),
    num_iterations: int | None = typer.Option(
        None, "--num-iterations", help="override the horizon (quick runs)"
    ),
    allow_repeat: bool = typer.Option(
        False, "--allow-repeat", help="train even if the arm's data would repeat"
    ),
) -> None:
    """Train the model on one arm (one seed) with 1..N ranks per node on 1..N nodes; resumable, never hangs.

    A stop (SIGTERM, SIGUSR1 as Slurm's --signal sends, Ctrl-C, `armlab stop`) finishes the step,
    saves a checkpoint and exits 130; `--resume` continues from it."""
    from armlab.spec import load_experiment
    from armlab.train.plan import TrainOptions
    from armlab.train.supervisor import train as train_arm

    overrides = {
        "depth": depth, "device_batch_size": device_batch_size, "total_batch_size": total_batch_size,
        "num_iterations": num_iterations, "allow_repeat": allow_repeat or None,
        "engine": engine or ("nanochat" if nanochat else None),  # --nanochat DIR: train with that checkout
        "nanochat.path": nanochat,
    }  # fmt: skip
    options = TrainOptions(
        seed=seed, run_name=run_name, num_gpus=num_gpus, device=device, nproc=nproc, master_port=master_port,
        nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
        resume=resume, detach=detach, force=force, overrides=overrides,
    )  # fmt: skip
    print(train_arm(load_experiment(exp), arm, options))


# -- end of train ------------------------------------------------------------------------------------


# -- export (owner: recipe engineer) -----------------------------------------------------------------
@app.command()
def export(
    exp: Path = typer.Argument(..., help="experiment file (or its workdir)"),
    arm: str = typer.Option(..., "--arm", help="the arm whose run to export"),
    to: Path = typer.Option(..., "--to", help="new (or empty) directory to write the nanochat base dir into"),
    seed: int | None = typer.Option(None, "--seed", help="the run of this seed (default: the first of train.seeds)"),
    run: str | None = typer.Option(None, "--run", help="the run by name (default: <arm>-s<seed>)", callback=name_flag),
) -> None:
    """Write a run's latest checkpoint as a nanochat base dir (base_checkpoints/ + tokenizer/)."""
    from armlab.spec import load_experiment
    from armlab.train.export import export_run

    print(export_run(load_experiment(exp), arm, to, seed=seed, run=run))


# -- end of export -----------------------------------------------------------------------------------
