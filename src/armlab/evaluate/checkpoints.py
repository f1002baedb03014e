"""Which checkpoints an evaluation scores, and their identity by content.

- `last_k_steps`: the steps at which the built-in trainer saves the last k checkpoints
  (`[evaluate] last_k`, `last_k_every`), so their scores measure the noise of Signal and Noise
  (Heineman et al. 2025: the standard deviation of a benchmark's score over the final checkpoints
  of one run, its "sensitivity to random variability between training steps").
- `weights_sha256`: the sha256 of a checkpoint's weight files, what eval.json records of the
  checkpoint it evaluated and what `compare` checks (an eval.json copied from another run names
  other weights). Hashing a large model takes seconds, so `armlab evaluate` leaves the digest beside
  the file (`.<name>.sha256.json`: size, mtime and digest) and later reads reuse it while the file's
  size and mtime are unchanged; reads that find none hash without writing (compare writes nothing).

Torch-free: compare imports it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from armlab.workdir import atomic_write_json


def last_k_steps(num_iterations: int, k: int, every: int | None) -> list[int]:
    """The last k checkpoint steps of a run of `num_iterations` steps, `every` apart (None: 5% of
    the run, at least 1), ascending and > 0; the last is the final step. Signal and Noise's final
    checkpoints are the model ladder's ordinary saves, a few percent of training apart; adjacent
    steps at the end of the decay barely differ (their noise would be ~0 and every SNR huge)."""
    gap = every or max(1, round(num_iterations / 20))
    return sorted({num_iterations - i * gap for i in range(k) if num_iterations - i * gap > 0})


def _sidecar(path: Path) -> Path:
    return path.parent / f".{path.name}.sha256.json"


def file_sha256(path: Path, remember: bool = False) -> str:
    """sha256 of one file, reusing the digest left beside it while size and mtime match."""
    st = path.stat()
    side = _sidecar(path)
    try:
        cached = json.loads(side.read_text())
        if cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if remember and os.access(path.parent, os.W_OK):
        atomic_write_json(side, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return digest


def weights_sha256(files: list[Path], remember: bool = False) -> str:
    """The content identity of a checkpoint: sha256 over its weight files' names and digests."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f, remember)}\n".encode())
    return h.hexdigest()
