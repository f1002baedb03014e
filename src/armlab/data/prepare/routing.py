"""Text pass (per pool file, in a worker): each file read once for every target.

Membership is a pure function of the file's .npz arrays and the `Rules`; each target's selected,
non-empty rows go to a stage-1 file sorted by the shuffle hash (`shuffle.StageWriter`). A unit
is done when its marker (with its counts) is written; a rerun skips done units.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from armlab.data.identity import mix, text_keys
from armlab.data.pool import PoolFile, iter_columns
from armlab.data.prepare.keys import load_keys
from armlab.data.prepare.targets import EVAL, Target
from armlab.data.prepare.thresholds import masks
from armlab.data.select import SALT_SHUFFLE, Rules
from armlab.data.shuffle import StageWriter
from armlab.errors import ArmlabError
from armlab.workdir import atomic_write_json


def done_marker(stage: Path, unit: int) -> Path:
    return stage / "done" / f"{unit:06d}.json"


def text_schema(target: Target) -> pa.Schema:
    fields = [pa.field("h", pa.uint64()), pa.field("text", pa.string())]
    if target.name == EVAL:
        fields += [pa.field("key", pa.uint64()), pa.field("text_key", pa.uint64())]
    return pa.schema(fields)


def route_unit(
    unit: int,
    batches: Iterable[pa.Table],
    keys: np.ndarray,
    member: dict[str, np.ndarray],
    tokens: np.ndarray | None,
    targets: list[Target],
    stage: Path,
    name: str,
) -> dict[str, Any]:
    """Send each target's selected, non-empty rows of one unit to its stage-1 file; return counts."""
    writers = {t.name: StageWriter(stage / t.name / f"{unit:06d}.arrow") for t in targets}
    stats = {t.name: {"rows": 0, "chars": 0, "tokens": 0, "dropped_empty": 0} for t in targets}
    off = 0
    try:
        for batch in batches:
            text = batch.column(0).combine_chunks()
            if not pa.types.is_string(text.type):
                text = text.cast(pa.string())
            n = len(text)
            valid = pc.fill_null(pc.greater(pc.binary_length(text), 0), False).to_numpy(zero_copy_only=False)
            for t in targets:
                m = member[t.name][off : off + n]
                st = stats[t.name]
                st["dropped_empty"] += int(np.count_nonzero(m & ~valid))
                idx = np.flatnonzero(m & valid)
                if not idx.size:
                    continue
                k = keys[off + idx]
                h = mix(k, t.shuffle_seed, SALT_SHUFFLE)
                order = np.argsort(h, kind="stable")  # stage-1 batches are sorted by h
                idx, k, h = idx[order], k[order], h[order]
                sub = text.take(pa.array(idx))
                cols = {"h": pa.array(h), "text": sub}
                if t.name == EVAL:
                    cols["key"] = pa.array(k)
                    cols["text_key"] = pa.array(text_keys(sub))
                writers[t.name].add(pa.table(cols))
                st["rows"] += len(idx)
                st["chars"] += int(pc.sum(pc.utf8_length(sub)).as_py() or 0)
                if tokens is not None:
                    st["tokens"] += int(tokens[off + idx].sum())
            off += n
        if off != len(keys):
            raise ArmlabError(
                f"{name}: has {off} rows but the key pass saw {len(keys)}; the file changed, rerun prepare"
            )
        for t in targets:
            writers[t.name].close(text_schema(t))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return stats


@dataclass(frozen=True)
class TextTask:
    """One pool file's text pass: route its rows for `targets` into `stage`."""

    unit: int
    pf: PoolFile
    local: Path | None  # the file itself or its downloaded copy; None: remote, read column-pruned in place
    keys_npz: Path
    rules: Rules
    text_column: str
    targets: list[Target]
    stage: Path


def text_pass(task: TextTask) -> dict[str, Any]:
    a = load_keys(task.keys_npz)
    member = masks(task.rules, a, [t.name for t in task.targets])
    batches = iter_columns(task.pf, [task.text_column], local=task.local, types={task.text_column: pa.string()})
    stats = route_unit(
        task.unit, batches, a["keys"], member, a.get("tokens"), task.targets, task.stage, task.pf.name
    )
    atomic_write_json(done_marker(task.stage, task.unit), stats)
    return stats
