"""A unit of scoring work (one pool file, or a row-group range of a large one), and the function
a worker runs for it (`run_score_task`): picklable records in, a sidecar file out.

The model is loaded once per worker process and kept, keyed by the scorer's identity and the
device (`worker_model`): the first unit a pool worker or a Ray actor runs resolves the model on
its own host (models.resolve: the cache, a download, the hub), checks its sha256 against the one
the run scores with, and loads it; every later unit reuses it.

A unit reads the pool file's id column (else the text, for the keys) and the columns its backend
scores from, a row group at a time, scores blocks of at least BLOCK_DOCS documents (whole row
groups: the blocks depend only on the unit's rows, never on the worker count), and writes its
sidecar atomically with what it was computed from in the footer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from armlab.data.identity import doc_keys
from armlab.data.pool import PoolFile, iter_columns
from armlab.data.prepare.executor import kill_point
from armlab.data.prepare.keys import as_text
from armlab.data.score import models
from armlab.data.score.backends import Model, get_backend
from armlab.data.score.sidecar import write_sidecar
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec, ScorerSpec


@dataclass(frozen=True)
class ScoreTask:
    """Score rows of `pf` (all, or its parquet row groups [lo, hi)) with `scorer` into `out`."""

    unit: int
    pf: PoolFile
    local: Path | None  # the downloaded copy, when the pool's fetch plan downloads this file
    row_groups: tuple[int, int] | None
    scorer: ScorerSpec
    identity: str  # the scorer's identity (sidecar.identity)
    model_sha256: str  # of the model the run scores with; a worker's copy must match
    pool: PoolSpec
    device: str  # "cpu" | "cuda"
    out: Path
    meta: dict[str, Any]  # the sidecar's footer
    model_path: str = ""  # where the parent found the model: used when it is there on the worker's host


@dataclass(frozen=True)
class UnitResult:
    rows: int
    unscored: int
    dtype: str  # what the model computed in


_MODELS: dict[tuple[str, str], tuple[Model, str]] = {}  # (identity, device) -> (model, dtype)


def worker_model(
    scorer: ScorerSpec, identity: str, model_sha256: str, device: str, hint: str = ""
) -> tuple[Model, str]:
    """This process's copy of the scorer's model, loaded on first use (one model kept at a time).
    A CPU run loads it in the parent before its workers fork (`run.score_one`): they share its
    memory copy-on-write, so a 2.4 GB fastText model is in memory once, not once per core. A
    worker that did not inherit it (a forkserver's, a Ray actor's) loads the parent's copy when
    `hint` is on its host and holds the same bytes, else resolves the model itself."""
    key = (identity, device)
    if key not in _MODELS:
        here = Path(hint) if hint and Path(hint).exists() else None
        resolved = (
            models.Resolved(here, model_sha256, str(here))
            if here is not None and models.content_sha256(here) == model_sha256
            else models.resolve(scorer)
        )
        if resolved.sha256 != model_sha256:
            raise ArmlabError(
                f"scorer {scorer.name!r}: the model here ({resolved.source}) has sha256 "
                f"{resolved.sha256[:12]}..., the run scores with {model_sha256[:12]}...; "
                "make every host's copy the same file"
            )
        _MODELS.clear()  # a worker serves one scorer at a time; free the last one's memory
        model = get_backend(scorer.kind).load(scorer, resolved.path, device)
        _MODELS[key] = (model, "bfloat16" if device.startswith("cuda") else "float32")
    return _MODELS[key]


def read_columns(scorer: ScorerSpec, pool: PoolSpec) -> tuple[list[str], list[str]]:
    """(columns a unit reads, the ones its backend scores from). Keys come from the id column,
    else from the text, which is then read too (a head over a pool without ids reads it)."""
    scored = get_backend(scorer.kind).columns(scorer, pool)
    read = ([pool.id_column] if pool.id_column else []) + scored
    if pool.id_column is None and pool.text_column not in read:
        read.append(pool.text_column)
    return list(dict.fromkeys(read)), scored


def run_score_task(task: ScoreTask) -> UnitResult:
    """Score one unit and write its sidecar (or part); errors name the pool file."""
    model, dtype = worker_model(task.scorer, task.identity, task.model_sha256, task.device, task.model_path)
    block_docs = get_backend(task.scorer.kind).block_docs
    read, scored = read_columns(task.scorer, task.pool)
    text_col = task.pool.text_column
    keys: list[np.ndarray] = []
    scores: list[np.ndarray] = []
    block: list[pa.Table] = []

    def flush() -> None:
        t = pa.concat_tables(block) if len(block) > 1 else block[0]
        block.clear()
        text = (
            as_text(task.pf.name, text_col, t.column(text_col).combine_chunks(), "")
            if text_col in read
            else None
        )
        if text is not None:
            t = t.set_column(t.schema.get_field_index(text_col), text_col, text)
        keys.append(doc_keys(t.column(task.pool.id_column) if task.pool.id_column else None, text))
        try:
            got = model.score(t.select(scored))
        except ArmlabError as e:
            raise ArmlabError(f"{task.pf.name}: {e}") from None
        scores.append(np.asarray(got, dtype=np.float32))
        kill_point("score")  # test hook: a unit stopped between its blocks

    types = {text_col: pa.string()}
    batches = iter_columns(task.pf, read, local=task.local, types=types, row_groups=task.row_groups)
    rows = 0
    for t in batches:
        block.append(t)
        rows += t.num_rows
        if sum(b.num_rows for b in block) >= block_docs:
            flush()
    if block:
        flush()
    k = np.concatenate(keys) if keys else np.zeros(0, dtype=np.uint64)
    s = np.concatenate(scores) if scores else np.zeros(0, dtype=np.float32)
    write_sidecar(task.out, k, s, task.meta)
    return UnitResult(rows, int(np.isnan(s).sum()), dtype)
