"""The files of a run dir other than checkpoints: state.json, metrics.jsonl, the launch plan.

`state.json` is rewritten atomically: by the launcher before it starts the ranks and after they
exit, and by rank 0 while they run (the two never overlap). `metrics.jsonl` is appended by
rank 0, one JSON object a line; on resume, lines after the checkpoint are dropped so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Any

from armlab.workdir import atomic_write_json, atomic_write_text, read_json

STATE = "state.json"
METRICS = "metrics.jsonl"
RUN = "run.json"
PLAN = "launch.json"
LOG = "train.log"
ERRORS = ".rank-errors"


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return read_json(Path(run_dir) / STATE)
    except FileNotFoundError:
        return {}


def write_state(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update state.json with `fields` (and `updated`), keeping the other fields."""
    state = {
        "state": "starting",
        "pid": None,
        "host": socket.gethostname(),
        "started": None,
        "ended": None,
        "error": None,
        "step": 0,
        "num_iterations": None,
        **read_state(run_dir),
        **fields,
        "updated": time.time(),
    }
    atomic_write_json(Path(run_dir) / STATE, state)
    return state


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete line of metrics.jsonl (a torn last line from a kill is skipped)."""
    out = []
    with contextlib.suppress(FileNotFoundError), open(Path(run_dir) / METRICS) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (the checkpoint a resume starts from)."""
    kept = [m for m in read_metrics(run_dir) if m.get("step", 0) <= step]
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(m) + "\n" for m in kept))


def rank_error_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / ERRORS / f"rank{rank}.json"


def read_rank_errors(run_dir: Path) -> list[dict[str, Any]]:
    """Errors the ranks recorded before dying, earliest first (the first is usually the cause)."""
    errors = []
    for p in sorted((Path(run_dir) / ERRORS).glob("rank*.json")):
        with contextlib.suppress(OSError, ValueError):
            errors.append(json.loads(p.read_text()))
    return sorted(errors, key=lambda e: e.get("time", 0))
