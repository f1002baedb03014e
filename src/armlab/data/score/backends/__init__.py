"""Scorer backends: the one seam between `armlab score` and the models that score documents.

A backend is what varies between a fastText classifier (`fasttext`), a Hugging Face sequence
classifier (`hf`) and a linear / MLP head over an embedding column already in the pool (`head`).
Everything else is the same for every backend and lives outside it: the units of work and the
executor (`score.run`), the sidecar files and their manifest (`score.sidecar`), where the model
comes from (`score.models`), progress, staleness, selection. Nothing outside this package
branches on a scorer's kind: it asks the backend.

    score.run.plan_units       backend.columns(scorer, pool)    pool columns read per unit
                               backend.identity(scorer, pool)   what the scores depend on
                               backend.devices(requested, cl)   ("cpu", n) or ("cuda", n): workers
    score.units.run_score_task backend.load(scorer, path, dev)  once per worker process (cached)
                               model.score(table)               float32 per row, NaN = no score,
                                                                blocks of >= backend.block_docs rows

A loaded model is kept per worker process, keyed by the scorer's identity (which holds the
model's content hash) and the device, so a pool worker or a Ray actor loads it once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    import pyarrow as pa

    from armlab.spec import PoolSpec, ScorerSpec

# kind -> "module:class"; the spec's ScorerKind Literal lists the same names.
BACKENDS = {
    "fasttext": "armlab.data.score.backends.fasttext:FastTextBackend",
    "hf": "armlab.data.score.backends.hf:HFBackend",
    "head": "armlab.data.score.backends.head:HeadBackend",
}


class Model(Protocol):
    """A scorer's model loaded in a worker."""

    def score(self, table: pa.Table) -> np.ndarray:
        """float32 scores of the table's rows (its columns: `Backend.columns`); NaN: no score."""
        ...


class Backend(Protocol):
    kind: str
    # rows handed to `Model.score` at once, at least (whole row groups; 0: one row group at a time).
    # hf sorts each block by length; per-row scorers gain nothing from bigger blocks.
    block_docs: int

    def columns(self, scorer: ScorerSpec, pool: PoolSpec) -> list[str]:
        """The pool columns the scores are computed from."""
        ...

    def identity(self, scorer: ScorerSpec, pool: PoolSpec) -> dict[str, Any]:
        """Besides the model: every setting the scores depend on (not batch sizes or workers)."""
        ...

    def devices(self, requested: str | None, cluster: Hardware | None = None) -> tuple[str, int]:
        """Where it runs on this host (or on a Ray `cluster`): ("cpu", cores) or ("cuda", gpus);
        one worker per unit."""
        ...

    def load(self, scorer: ScorerSpec, path: Path, device: str) -> Model:
        """The model at `path` (resolved by score.models) ready to score on `device`."""
        ...


def get_backend(kind: str) -> Backend:
    module, cls = BACKENDS[kind].split(":")
    return getattr(importlib.import_module(module), cls)()


@dataclass(frozen=True)
class Hardware:
    """A Ray cluster's CPUs and GPUs (`--executor ray`: scorers run on its nodes, not here)."""

    cpus: int
    gpus: int


def cpu_count() -> int:
    """The cores this process may use (the affinity mask, which a container or taskset narrows)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def nan_scores(n: int) -> np.ndarray:
    return np.full(n, np.nan, dtype=np.float32)
