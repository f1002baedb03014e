"""Training checkpoints: `<run dir>/checkpoints/step_000500/`, written atomically.

A checkpoint is a directory: `model.pt` (weights, nanochat's parameter names), `optim.pt`
(optimiser state, identical on every rank), `state.pt` (every rank's loader state and RNG
states) and `meta.json` (step, model config, fingerprints, the byte size of each file). It is
written under a temp name and renamed into place, so a directory named `step_*` is complete
when written; a kill leaves only a temp dir, which the next save or resume removes.

Damage after the fact is caught too: a checkpoint whose files are missing, of another size than
meta.json records, or not readable as torch zip archives (a truncated copy, a full disk during a
copy) is named in a warning and skipped, so resume and evaluation fall back to the newest intact
checkpoint. A save that would not fit on the disk is refused before writing (and one that runs
out of space midway is cleaned up), with the path and the bytes it needs.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch

from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.runs import CHECKPOINTS
from armlab.workdir import atomic_write_json, read_json

STEP_RE = re.compile(r"^step_(\d{6,})$")
FILES = ("model.pt", "optim.pt", "state.pt")
DISK_MARGIN = 1.05  # torch's zip container adds a little to the tensor bytes
FULL_BELOW = 1 << 20  # a write that failed with less than this left on the filesystem ran out of space
_WARNED: set[str] = set()


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:06d}"


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint directory (None: intact as far as cheap checks can tell)."""
    try:
        meta = read_json(ckpt / "meta.json")
    except FileNotFoundError:
        return "no meta.json"
    except (OSError, ValueError) as e:
        return f"meta.json unreadable ({e})"
    sizes = meta.get("files") or {}
    for name in FILES:
        path = ckpt / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        if name in sizes and size != sizes[name]:
            return f"{name} is {size:,} bytes, {sizes[name]:,} when written (truncated or overwritten)"
        if not zipfile.is_zipfile(path):
            return f"{name} is not a torch checkpoint archive (truncated or corrupt)"
    return None


def list_steps(run_dir: Path, warn: bool = True) -> list[int]:
    """Steps of the intact checkpoints of a run, ascending; damaged ones are named and skipped."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if not m or not (p / "meta.json").is_file():
            continue
        problem = damage(p)
        if problem is None:
            steps.append(int(m.group(1)))
        elif warn and str(p) not in _WARNED:
            _WARNED.add(str(p))
            console.print(f"[yellow]checkpoint {p}: {problem}; skipping it (falling back to an older one)[/]")
    return sorted(steps)


def remove_partial(run_dir: Path) -> None:
    """Delete temp dirs left by a save that was killed."""
    root = checkpoints_dir(run_dir)
    if root.is_dir():
        for p in root.glob(".step_*.tmp*"):
            shutil.rmtree(p, ignore_errors=True)


def _save_file(obj: Any, path: Path) -> int:
    torch.save(obj, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return path.stat().st_size


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state dict: what torch.save will write, near enough."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _disk_full(where: Path, needed: int, free: int | None = None) -> ArmlabError:
    free = shutil.disk_usage(where).free if free is None else free
    return ArmlabError(
        f"{where}: disk full: a checkpoint needs ~{needed:,} bytes, {free:,} free on that filesystem; "
        "free some space (or delete old checkpoints) and resume with `armlab train ... --resume`"
    )


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank_states: list[dict[str, Any]],
    meta: dict[str, Any],
) -> Path:
    """Write checkpoint `step` (rank 0 only): temp dir, fsync, rename. Refuses (ArmlabError naming
    the path and the bytes needed) when the disk cannot hold it, before or while writing."""
    final = checkpoint_dir(run_dir, step)
    remove_partial(run_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    objects = {
        "model.pt": model.state_dict(),
        "optim.pt": optimizer.state_dict(),
        "state.pt": {"ranks": rank_states},
    }
    needed = int(sum(_tensor_bytes(o) for o in objects.values()) * DISK_MARGIN) + (1 << 16)
    free = shutil.disk_usage(final.parent).free
    if free < needed:
        raise _disk_full(final.parent, needed, free)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        sizes = {name: _save_file(obj, tmp / name) for name, obj in objects.items()}
        atomic_write_json(
            tmp / "meta.json", {**meta, "step": step, "world_size": len(rank_states), "files": sizes}
        )
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
    except BaseException as e:
        # torch's zip writer reports ENOSPC as a RuntimeError ("unexpected pos ..."): ask the disk
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and isinstance(e, (OSError, RuntimeError)):
            full = shutil.disk_usage(final.parent).free < FULL_BELOW
        written = sum(f.stat().st_size for f in tmp.glob("*") if f.is_file()) if full else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _disk_full(final.parent, max(needed, written)) from None
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
        "model": load_state(d / "model.pt", device),
        "optim": load_state(d / "optim.pt", device),
        "ranks": load_state(d / "state.pt", "cpu", weights_only=False)["ranks"],
    }


def load_state(path: Path, device: str | torch.device = "cpu", weights_only: bool = True) -> Any:
    """torch.load of one checkpoint file; a corrupt one is an ArmlabError naming it."""
    try:
        return torch.load(path, map_location=device, weights_only=weights_only)
    except Exception as e:  # torch.load raises many types for a damaged file (pickle, zip, EOF, ...)
        raise ArmlabError(
            f"{path}: corrupt checkpoint file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"delete {path.parent} to fall back to the previous checkpoint"
        ) from None


def load_model(
    run_dir: str | Path, step: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Any, dict[str, Any]]:
    """The trained GPT of a run (latest intact checkpoint unless `step`), in eval mode, with its meta.

    On CUDA (sm80+) it runs in bf16 like training; elsewhere in fp32 (bf16 weights are upcast).
    """
    from armlab.train.model import GPTConfig, build_model, compute_dtype_for

    run_dir = Path(run_dir)
    d = checkpoint_dir(run_dir, resolve_step(run_dir, step))
    meta = read_json(d / "meta.json")
    state = load_state(d / "model.pt", "cpu")
    cfg = GPTConfig(**meta["model_config"])
    model = build_model(cfg, device, compute_dtype_for(device), init=False)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing or "window_pattern" not in meta["model_config"]:
        raise ArmlabError(
            f"{d}: written by an older armlab (before the nanochat 92d63d4 recipe; lacks {', '.join(missing[:3]) or 'window_pattern'}); "
            "retrain the run with this version"
        )
    model.load_state_dict(state)
    return model.eval(), meta
