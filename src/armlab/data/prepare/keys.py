"""Key pass (per pool file, in a worker): the small per-document arrays selection needs.

Reads only the id column (else the text), the score columns and the token counts the arms need,
and saves keys / scores / weights to a small .npz. Remote parquet is read with ranged column
reads, so no text is downloaded here (unless the store ignores Range: then `local` is a download).
A scorer's scores (`armlab score`) join here: the file's sidecar holds one (key, score) per row in
the file's order, so the join is positional, checked key by key (`scorer:<name>` arrays).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from armlab.data.identity import doc_keys
from armlab.data.pool import BadFile, PoolFile, iter_columns, parquet_metadata
from armlab.data.score.fresh import SidecarRead
from armlab.data.score.sidecar import read_sidecar
from armlab.errors import ArmlabError
from armlab.spec import ArmSpec, Experiment
from armlab.workdir import atomic_path


@dataclass(frozen=True)
class Columns:
    """Which pool columns the key pass reads."""

    id: str | None
    text: str
    scores: tuple[str, ...]
    tokens: str | None
    need_chars: bool  # chars per document are needed (token estimate) -> the key pass reads text
    group: str | None = None  # `[report] group_column`: counted per arm for the report
    scorers: tuple[str, ...] = ()  # scorers whose sidecars join the arrays (`scorer:<name>`)

    @property
    def read(self) -> list[str]:
        cols = [self.id] if self.id else []
        if self.id is None or self.need_chars:
            cols.append(self.text)
        cols += [c for c in self.scores if c not in cols]
        for extra in (self.tokens, self.group):
            if extra and extra not in cols:
                cols.append(extra)
        return cols


def stats_score_column(exp: Experiment) -> str | None:
    """The score the arms' data statistics histogram: the experiment's first arm's that has one."""
    return next((a.score_column for a in exp.arms if a.score_column), None)


def key_columns(exp: Experiment, arms: list[ArmSpec]) -> Columns:
    scorers = {x.name for x in getattr(exp, "scorers", [])}
    numeric = exp.report.group_column if exp.report.group_bins else None  # a numeric group: read as a score
    binned = None if numeric in scorers else numeric  # a scorer's scores join from its sidecars instead
    wanted = [a.score_column for a in arms if a.score_column] + [stats_score_column(exp), binned]
    scores = tuple(dict.fromkeys(c for c in wanted if c))
    by_tokens = any(a.by == "tokens" or a.max_tokens for a in arms)
    tokens = exp.pool.token_count_column  # a small integer column: read it when there is one (exact counts)
    return Columns(
        id=exp.pool.id_column,
        text=exp.pool.text_column,
        scores=scores,
        tokens=tokens,
        need_chars=by_tokens and tokens is None,
        group=None if numeric else exp.report.group_column,
    )


def is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def is_bytes_type(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)


def check_text_type(name: str, column: str, t: pa.DataType) -> None:
    """Documents are strings (or UTF-8 bytes, validated when read); anything else is refused:
    integers cast to "1345" would otherwise be trained on as documents."""
    if not (is_text_type(t) or is_bytes_type(t) or pa.types.is_null(t)):
        raise ArmlabError(
            f"{name}: text column {column!r} has type {t}, not a string; point pool.text_column at the "
            "column that holds the documents' text"
        )


def as_text(name: str, column: str, text: pa.Array, where: str) -> pa.Array:
    """`text` as a string array: UTF-8 bytes are validated (BadFile naming `where` if invalid)."""
    check_text_type(name, column, text.type)
    if pa.types.is_string(text.type):
        return text
    try:
        return text.cast(pa.string())
    except pa.ArrowInvalid:
        raise BadFile(
            name, f"invalid UTF-8 in text column {column!r}{', ' + where if where else ''}"
        ) from None


@dataclass(frozen=True)
class TextFooter:
    """What a parquet footer says about the text column, for a key pass that does not read it."""

    type: pa.DataType | None
    rows: list[int]  # per row group
    bytes: list[int]  # per row group: uncompressed text bytes (an estimate of its chars)


def _parquet_text_footer(pf: PoolFile, column: str, local: Path | None = None) -> TextFooter:
    """A remote footer comes from the one ranged read the pass makes anyway."""
    md = parquet_metadata(pf, local)
    schema = md.schema.to_arrow_schema()
    idx = [i for i in range(md.num_columns) if md.schema.column(i).path == column]
    rows, sizes = [], []
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        total = sum(rg.column(i).total_uncompressed_size for i in idx)
        rows.append(rg.num_rows)
        sizes.append(max(0, total - 4 * rg.num_rows))  # PLAIN stores a 4-byte length per value
    return TextFooter(schema.field(column).type if column in schema.names else None, rows, sizes)


@dataclass(frozen=True)
class KeyTask:
    """One pool file's key pass: read `pf`'s key columns into `out`."""

    unit: int
    pf: PoolFile
    cols: Columns
    out: Path
    skip_bad_files: bool
    local: Path | None = None  # the downloaded copy, when the fetch plan downloads this file
    sidecars: tuple[SidecarRead, ...] = ()  # this file's scores, one per scorer in cols.scorers


@dataclass(frozen=True)
class KeyDone:
    """One file's key pass: the documents it keyed, or why it was skipped (skip_bad_files)."""

    rows: int
    bad: str | None = None


def run_key_task(task: KeyTask) -> KeyDone:
    """The key pass of one file; with skip_bad_files an unreadable file is returned with a reason."""
    try:
        return KeyDone(key_pass(task.pf, task.cols, task.out, task.local, task.sidecars))
    except BadFile as e:
        if not task.skip_bad_files:
            raise
        return KeyDone(0, f"{e.file} ({e.reason})")


def key_pass(
    pf: PoolFile, cols: Columns, out: Path, local: Path | None = None, sidecars: tuple[SidecarRead, ...] = ()
) -> int:
    """Read the key/score/token columns of one pool file into `out` (.npz, atomic), streaming
    (memory: one row group or jsonl block plus the small per-row arrays); returns its rows."""
    read = cols.read
    if pf.fmt == "jsonl" and cols.text not in read:
        read = [*read, cols.text]  # every jsonl line is parsed anyway: take exact chars for free
    types = {cols.text: pa.string(), **{c: pa.float64() for c in cols.scores}}
    parts: dict[str, list[np.ndarray]] = {}
    groups: dict[str, int] = {}  # group value -> code, over the whole file
    null_ids = 0
    # Without text the columns are a few bytes a row: parquet is read whole (coalesced ranged reads).
    footer = _parquet_text_footer(pf, cols.text, local) if cols.text not in read else None
    if footer is not None and footer.type is not None:
        check_text_type(pf.name, cols.text, footer.type)
    whole = cols.text not in read
    batches = iter_columns(pf, read, expect=(cols.text,), local=local, types=types, whole_file=whole)
    for rg, t in enumerate(batches):
        text = None
        if cols.text in t.column_names:  # parquet: one row group a table here
            where = f"row group {rg}" if pf.fmt == "parquet" else f"block {rg}"
            text = as_text(pf.name, cols.text, t.column(cols.text).combine_chunks(), where)
        if cols.id and t.column(cols.id).null_count:
            null_ids += t.column(cols.id).null_count
            continue
        got = {"keys": doc_keys(t.column(cols.id) if cols.id else None, text)}
        if text is not None:
            got["chars"] = pc.fill_null(pc.utf8_length(text), 0).to_numpy().astype(np.int64)
        for c in cols.scores:
            col = t.column(c)
            if not (
                pa.types.is_integer(col.type)
                or pa.types.is_floating(col.type)
                or pa.types.is_decimal(col.type)
            ):
                raise ArmlabError(
                    f"{pf.name}: score column {c!r} has type {col.type}, not a number; point score_column at a numeric column"
                )
            got[f"score:{c}"] = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
        if cols.tokens:
            col = t.column(cols.tokens)
            if not pa.types.is_integer(col.type):
                raise ArmlabError(
                    f"{pf.name}: token_count_column {cols.tokens!r} has type {col.type}, not an integer"
                )
            got["tokens"] = pc.fill_null(col, 0).to_numpy().astype(np.int64)
        if cols.group:
            got["group"] = _group_codes(pf, cols.group, t.column(cols.group), groups)
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    if null_ids:
        raise ArmlabError(
            f"{pf.name}: id column {cols.id!r} has {null_ids} null values; fix the data, "
            "or remove pool.id_column to identify documents by a hash of their text"
        )
    empty = {"keys": np.uint64, "chars": np.int64, "tokens": np.int64, "group": np.int32}
    wanted = ["keys", *(f"score:{c}" for c in cols.scores)]
    wanted += ["tokens"] if cols.tokens else []
    wanted += ["group"] if cols.group else []
    wanted += ["chars"] if cols.text in read else []
    arrays = {
        k: np.concatenate(parts[k]) if k in parts else np.zeros(0, dtype=empty.get(k, np.float64))
        for k in wanted
    }
    for sc in sidecars:
        arrays[f"scorer:{sc.scorer}"] = _joined_scores(pf, sc, arrays["keys"])
    if cols.group:
        arrays["group_values"] = np.array(list(groups), dtype=np.str_)
    if "chars" in arrays:
        arrays["text_bytes"] = np.array(int(arrays["chars"].sum()))
    else:  # parquet metadata, no data read: each document's length estimated by its row group's mean
        assert footer is not None
        arrays["text_bytes"] = np.array(sum(footer.bytes))
        means = [b / max(r, 1) for r, b in zip(footer.rows, footer.bytes, strict=True)]
        est = np.repeat(np.array(means, dtype=np.float64), footer.rows)
        arrays["chars_est"] = (
            est
            if len(est) == len(arrays["keys"])
            else np.full(len(arrays["keys"]), est.mean() if len(est) else 0.0)
        )
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return len(arrays["keys"])


def _joined_scores(pf: PoolFile, sc: SidecarRead, keys: np.ndarray) -> np.ndarray:
    """The scorer's scores of this file's rows, from its sidecar (same rows, same order)."""
    skeys, scores = read_sidecar(sc.path, sc.expect)
    if len(skeys) != len(keys) or not np.array_equal(skeys, keys):
        raise ArmlabError(
            f"{sc.path}: its document keys are not those of {pf.name} (the pool's id column changed?); "
            f"run `armlab score EXP --scorer {sc.scorer} --overwrite`"
        )
    return scores


def _group_codes(pf: PoolFile, column: str, col: pa.ChunkedArray, groups: dict[str, int]) -> np.ndarray:
    """Codes of a categorical column's values (-1: null), numbered over the file in `groups`."""
    enc = pc.dictionary_encode(col.combine_chunks())
    try:
        values = pc.cast(enc.dictionary, pa.string()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ArmlabError(
            f"{pf.name}: report.group_column {column!r} has type {col.type}, not a category; "
            "name a string or integer column"
        ) from None
    remap = np.array([groups.setdefault(v, len(groups)) for v in values] + [-1], dtype=np.int32)
    idx = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
    return remap[idx]  # -1 indexes the trailing -1: null stays null


KEY_CACHE_BYTES = 256 << 20  # the parent's key arrays kept in memory while it picks thresholds


class _KeyCache:
    """The arrays of as many files as fit in `left` bytes, read-only (callers share them)."""

    def __init__(self, budget: int):
        self.arrays: dict[Path, dict[str, np.ndarray]] = {}
        self.left = budget

    def keep(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        size = sum(v.nbytes for v in arrays.values())
        if size <= self.left:
            for v in arrays.values():
                v.flags.writeable = False
            self.arrays[path], self.left = arrays, self.left - size


_cache: _KeyCache | None = None


@contextlib.contextmanager
def cached_keys(budget: int = KEY_CACHE_BYTES) -> Iterator[None]:
    """Inside this block `load_keys` keeps what fits in `budget`, for the thresholds' several
    passes over every file's arrays: a 1 GB pool's .npz files are read once instead of eight
    times (those loads were a third of the parent's own work in prepare, all of it serial); a pool
    whose arrays exceed the budget reads the rest again each pass, as before."""
    global _cache
    _cache = _KeyCache(budget)
    try:
        yield
    finally:
        _cache = None


def load_keys(path: Path) -> dict[str, np.ndarray]:
    if _cache is not None and (hit := _cache.arrays.get(path)) is not None:
        return dict(hit)
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if _cache is not None:
        _cache.keep(path, arrays)
    return dict(arrays)
