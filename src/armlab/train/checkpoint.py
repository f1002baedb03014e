"""Training checkpoints: `<run dir>/checkpoints/step_000500/`, written atomically.

A checkpoint is a directory: `model.pt` (weights), `optim.pt` (optimiser state, identical on
every rank), `state.pt` (every rank's loader state and RNG states, the loop's counters) and
`meta.json` (step, model config, fingerprints). It is written under a temp name and renamed
into place, so a directory named `step_*` is always complete; a kill leaves only a temp dir,
which the next save or resume removes.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from armlab.errors import ArmlabError
from armlab.runs import CHECKPOINTS
from armlab.workdir import atomic_write_json, read_json

STEP_RE = re.compile(r"^step_(\d{6,})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


def list_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for p in root.iterdir()
        if (m := STEP_RE.match(p.name)) and (p / "meta.json").is_file()
    )


def remove_partial(run_dir: Path) -> None:
    """Delete temp dirs left by a save that was killed."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.glob(".step_*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def _save_file(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_states: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    """Write checkpoint `step` (rank 0 only): temp dir, fsync, rename."""
    final = checkpoint_dir(run_dir, step)
    remove_partial(run_dir)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        _save_file(model.state_dict(), tmp / "model.pt")
        _save_file(optimizer.state_dict(), tmp / "optim.pt")
        _save_file({"ranks": rank_states}, tmp / "state.pt")
        atomic_write_json(tmp / "meta.json", {**meta, "step": step, "world_size": len(rank_states)})
        if final.exists():  # a rerun of the same step: swap the old one out first
            old = final.parent / f".{final.name}.tmp-old-{os.getpid()}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def resolve_step(run_dir: Path, step: int | None) -> int:
    steps = list_steps(run_dir)
    if not steps:
        raise ArmlabError(
            f"{checkpoints_dir(run_dir)}: no complete checkpoint; train the run first (or check the path)"
        )
    if step is None:
        return steps[-1]
    if step not in steps:
        raise ArmlabError(f"{run_dir}: no checkpoint at step {step} (have {', '.join(map(str, steps))})")
    return step


def read_meta(run_dir: Path, step: int | None = None) -> dict[str, Any]:
    return read_json(checkpoint_dir(run_dir, resolve_step(run_dir, step)) / "meta.json")


def load_checkpoint(
    run_dir: Path, step: int | None = None, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Everything a resume needs: meta, model and optimiser state dicts, per-rank states."""
    d = checkpoint_dir(run_dir, resolve_step(run_dir, step))
    return {
        "meta": read_json(d / "meta.json"),
        "model": torch.load(d / "model.pt", map_location=device, weights_only=True),
        "optim": torch.load(d / "optim.pt", map_location=device, weights_only=True),
        "ranks": torch.load(d / "state.pt", map_location="cpu", weights_only=False)["ranks"],
    }


def load_model(
    run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """The trained GPT of a run (latest checkpoint unless `step`), in eval mode, with its meta."""
    from armlab.train.model import GPT, GPTConfig

    run_dir = Path(run_dir)
    d = checkpoint_dir(run_dir, resolve_step(run_dir, step))
    meta = read_json(d / "meta.json")
    model = GPT(GPTConfig(**meta["model_config"]))
    model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    return model.to(device).eval(), meta
