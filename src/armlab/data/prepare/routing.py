"""Text pass (per pool file, in a worker): each file read once for every target.

Membership is a pure function of the file's .npz arrays and the `Rules`; each target's selected,
non-empty rows go to a stage-1 file sorted by the shuffle hash (`shuffle.StageWriter`). A unit
is done when its marker (with its counts) is written; a rerun skips done units.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from armlab.data.identity import mix, text_keys
from armlab.data.pool import BadFile, PoolFile, deleted, iter_columns, local_identity, parquet_metadata
from armlab.data.prepare.executor import kill_point
from armlab.data.prepare.keys import as_text, load_keys
from armlab.data.prepare.stats import StatsSpec, unit_stats
from armlab.data.prepare.targets import EVAL, Target
from armlab.data.prepare.thresholds import masks
from armlab.data.select import Rules
from armlab.data.shuffle import CHARS, StageWriter, stage_batch_bytes
from armlab.errors import ArmlabError
from armlab.workdir import atomic_write_json

# Rows a local parquet file is read in (each within one row group): a few MB of text, so the
# reader's buffers are reused from batch to batch. Whole row groups (tens of MB each) were
# fresh allocations every time, and the page faults of touching them cost as much system time
# as the decoding itself (bench/prepare.py: text pass CPU -35% on a 1 GB pool).
READ_BATCH_ROWS = 2048


def _row_group_of(pf: PoolFile, local: Path | None) -> Callable[[int], str]:
    """`row -> "row group N"` for error messages, from the footer (read only on that error path)."""

    def where(row: int) -> str:
        md = parquet_metadata(pf, local)
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        return f"row group {int(np.searchsorted(starts, row, side='right')) - 1}"

    return where


def done_marker(stage: Path, unit: int) -> Path:
    return stage / "done" / f"{unit:06d}.json"


def text_schema(target: Target) -> pa.Schema:
    """A target's stage-1 rows: the shuffle hash, the text and its characters (counted once, here;
    the shard writer and the tokenizer sample's budget read them), and the eval set's keys."""
    fields = [pa.field("h", pa.uint64()), pa.field("text", pa.string()), pa.field(CHARS, pa.int32())]
    if target.name == EVAL:
        fields += [pa.field("key", pa.uint64()), pa.field("text_key", pa.uint64())]
        fields += [pa.field(c, pa.string() if c.startswith("group:") else pa.float64())
                   for c in target.columns if c.startswith(("score:", "scorer:", "group:"))]  # fmt: skip
    return pa.schema(fields)


def eval_label_arrays(target: Target, a: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, pa.Array]:
    """The eval set's label columns for the pool rows `rows` (`targets.eval_labels`): scores as
    read by the key pass, the group column's values (null where the pool has none)."""
    out: dict[str, pa.Array] = {}
    for c in target.columns:
        if c.startswith(("score:", "scorer:")):
            out[c] = pa.array(a[c][rows], type=pa.float64(), from_pandas=True)  # NaN: no score
        elif c.startswith("group:"):
            codes = a["group"][rows]
            values = np.asarray(a["group_values"], dtype=object)
            out[c] = pa.array([values[k] if k >= 0 else None for k in codes], type=pa.string())
    return out


def route_unit(
    unit: int,
    batches: Iterable[pa.Table],
    a: dict[str, np.ndarray],
    member: dict[str, np.ndarray],
    targets: list[Target],
    stage: Path,
    name: str,
    text_column: str = "text",
    where: Callable[[int], str] | None = None,
    stats_spec: StatsSpec | None = None,
    staged: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Send each target's selected, non-empty rows of one unit to its stage-1 file; return counts.

    `batches` are the unit's text column in file order, in batches of any size; `where(row)`
    names the part of the file holding a row (its parquet row group) for an invalid-UTF-8 error;
    `a` holds its per-row arrays (`keys`, and `tokens`, scores, group codes when the key pass read
    them); `staged` the text each target is expected to stage in all (it sizes the stage-1 batches).
    Only the selected documents' characters are counted (UTF-8 decoding is the cost); emptiness is
    a byte length of 0."""
    keys, tokens = a["keys"], a.get("tokens")
    writers = {
        t.name: StageWriter(
            stage / t.name / f"{unit:06d}.arrow", text_schema(t), stage_batch_bytes((staged or {}).get(t.name, 0))
        )
        for t in targets
    }
    stats: dict[str, dict[str, Any]] = {
        t.name: {"rows": 0, "chars": 0, "tokens": 0, "dropped_empty": 0} for t in targets
    }
    kept = {t.name: np.zeros(len(keys), dtype=bool) for t in targets}
    doc_chars = np.zeros(len(keys), dtype=np.int64)
    off = 0
    try:
        for batch in batches:
            text = as_text(name, text_column, batch.column(0).combine_chunks(), where(off) if where else "")
            n = len(text)
            if off + n > len(keys):
                off += n  # more rows than the key pass saw: refused below
                break
            valid = pc.fill_null(pc.binary_length(text), 0).to_numpy(zero_copy_only=False) > 0
            for t in targets:
                m = member[t.name][off : off + n]
                st = stats[t.name]
                st["dropped_empty"] += int(np.count_nonzero(m & ~valid))
                idx = np.flatnonzero(m & valid)
                if not idx.size:
                    continue
                k = keys[off + idx]
                sub = text.take(pa.array(idx))
                n_chars = pc.utf8_length(sub)
                cols = {"h": pa.array(mix(k, t.shuffle_seed, t.salt)), "text": sub, CHARS: n_chars}
                if t.name == EVAL:
                    cols["key"] = pa.array(k)
                    cols["text_key"] = pa.array(text_keys(sub))
                    cols.update(eval_label_arrays(t, a, off + idx))
                writers[t.name].add(pa.table(cols))
                chars = n_chars.to_numpy(zero_copy_only=False)
                doc_chars[off + idx] = chars
                kept[t.name][off + idx] = True
                st["rows"] += len(idx)
                st["chars"] += int(chars.sum())
                if tokens is not None:
                    st["tokens"] += int(tokens[off + idx].sum())
            off += n
        if off != len(keys):
            has = f"{off}" if off < len(keys) else f"more than {len(keys)}"
            raise ArmlabError(
                f"{name}: has {has} rows but the key pass saw {len(keys)}; the file changed, rerun prepare"
            )
        for i, w in enumerate(writers.values()):
            w.close()
            if i == 0:
                kill_point("text")  # test hook: one stage file in place, the unit not done
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if stats_spec is not None:
        for t in targets:
            if t.name in stats_spec.arms:
                stats[t.name]["data"] = unit_stats(stats_spec, t.name, kept, doc_chars, a)
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
    skip_bad_files: bool = False
    stats_spec: StatsSpec | None = None
    staged: dict[str, int] | None = None  # each target's expected stage-1 text, all units together


def run_text_task(task: TextTask) -> dict[str, Any]:
    """The text pass of one file; with skip_bad_files an unreadable file is returned as
    {"bad": reason} (its stage files removed, no done marker) instead of raised."""
    try:
        return text_pass(task)
    except BadFile as e:
        if not task.skip_bad_files:
            raise
        return {"bad": f"{e.file} ({e.reason})"}


def text_pass(task: TextTask) -> dict[str, Any]:
    pf = task.pf
    if not pf.remote:
        try:
            same = local_identity(pf.path, pf.fmt) == pf.identity  # one footer read
        except FileNotFoundError:
            raise deleted(pf) from None
        if not same:
            raise ArmlabError(f"{pf.name}: changed while prepare ran (its keys are stale); rerun prepare")
    a = load_keys(task.keys_npz)
    member = masks(task.rules, a, [t.name for t in task.targets])
    batches = iter_columns(
        task.pf, [task.text_column], local=task.local, types={task.text_column: pa.string()},
        batch_rows=READ_BATCH_ROWS,
    )  # fmt: skip
    stats = route_unit(
        task.unit, batches, a, member, task.targets, task.stage, pf.name,
        task.text_column, where=_row_group_of(pf, task.local) if pf.fmt == "parquet" else None,
        stats_spec=task.stats_spec, staged=task.staged,
    )  # fmt: skip
    atomic_write_json(done_marker(task.stage, task.unit), stats)
    return stats
