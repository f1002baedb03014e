"""`armlab prepare`: pool -> eval holdout -> tokenizer sample -> every arm's shuffled shards.

The pipeline, for all targets (eval set, tokenizer sample, each pool arm) at once:

1. Key pass (per pool file, parallel): read only the id column (else the text), the score
   columns and the token counts the arms need; save keys/scores/weights to a small .npz.
   Remote parquet is read with ranged column reads, so no text is downloaded here.
2. Thresholds (parent, bounded memory): the eval cut, the tokenizer fraction, each `top` /
   `sample` arm's exact global threshold and each `max_rows` / `max_tokens` cap, by radix
   select over the .npz files (`select.rank_threshold`).
3. Text pass (per pool file, parallel, each file read once for every target): membership is a
   pure function of the .npz arrays and the thresholds; each target's rows go to a stage-1
   file sorted by the shuffle hash (`shuffle.StageWriter`). A unit is done when its marker
   (with its counts) is written; a rerun skips done units.
4. Shuffle and write (per target, parallel): `shuffle.merge` streams rows in hash order into
   `shard_00000.parquet ...` in a partial dir, which is swapped into place with its manifest.

Prebuilt arms (a local dir, or `az://` fetched by `armlab.data.blob.fetch_prebuilt`) skip
1-2: their files are the selection; eval docs are removed (by id, else by text hash) and the
rows are shuffled and re-sharded the same way.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from armlab.data import holdout
from armlab.data.identity import doc_keys, mix, text_keys
from armlab.data.pool import (
    BadFile,
    PoolFile,
    Prefetcher,
    describe_error,
    file_stats,
    iter_columns,
    list_pool,
)
from armlab.data.select import (
    CHARS_PER_TOKEN,
    SALT_SHUFFLE,
    Chunk,
    Rules,
    Threshold,
    arm_base,
    arm_members,
    cap_rank,
    cap_threshold,
    rank_threshold,
    weights,
)
from armlab.data.shards import MANIFEST, ShardWriter, finish_dir, read_shards
from armlab.data.shuffle import StageWriter, merge
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import ArmSpec, Experiment, PoolSpec, fingerprint, fingerprint_diff
from armlab.workdir import Workdir, atomic_path, atomic_write_json, check_writable, open_workdir, read_json

EVAL = "eval"
TOKENIZER = "tokenizer"


# -- what to build ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One output dir fed by the text pass: the eval set, the tokenizer sample, or a pool arm."""

    name: str
    out_dir: Path
    shuffle_seed: int
    columns: tuple[str, ...]  # columns written to the shards
    selection: dict[str, Any]
    fingerprint: str


@dataclass(frozen=True)
class Columns:
    """Which pool columns the key pass reads."""

    id: str | None
    text: str
    scores: tuple[str, ...]
    tokens: str | None
    need_chars: bool  # chars per document are needed (token estimate) -> the key pass reads text

    @property
    def read(self) -> list[str]:
        cols = [self.id] if self.id else []
        if self.id is None or self.need_chars:
            cols.append(self.text)
        cols += [c for c in self.scores if c not in cols]
        if self.tokens and self.tokens not in cols:
            cols.append(self.tokens)
        return cols


def key_columns(exp: Experiment, arms: list[ArmSpec]) -> Columns:
    scores = tuple(dict.fromkeys(a.score_column for a in arms if a.score_column))
    by_tokens = any(a.by == "tokens" or a.max_tokens for a in arms)
    tokens = exp.pool.token_count_column  # a small integer column: read it when there is one (exact counts)
    return Columns(
        id=exp.pool.id_column,
        text=exp.pool.text_column,
        scores=scores,
        tokens=tokens,
        need_chars=by_tokens and tokens is None,
    )


# -- key pass (worker) -----------------------------------------------------------------------------
def key_pass(pf: PoolFile, cols: Columns, out: Path) -> None:
    """Read the key/score/token columns of one pool file into `out` (.npz, atomic), streaming
    (memory: one row group or jsonl block plus the small per-row arrays)."""
    read = cols.read
    if pf.fmt == "jsonl" and cols.text not in read:
        read = [*read, cols.text]  # every jsonl line is parsed anyway: take exact chars for free
    types = {cols.text: pa.string(), **{c: pa.float64() for c in cols.scores}}
    parts: dict[str, list[np.ndarray]] = {}
    null_ids = 0
    # Without text the columns are a few bytes a row: parquet is read whole (coalesced ranged reads).
    for t in iter_columns(pf, read, expect=(cols.text,), types=types, whole_file=cols.text not in read):
        if cols.id and t.column(cols.id).null_count:
            null_ids += t.column(cols.id).null_count
            continue
        text = t.column(cols.text) if cols.text in t.column_names else None
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
        for k, v in got.items():
            parts.setdefault(k, []).append(v)
    if null_ids:
        raise ArmlabError(
            f"{pf.name}: id column {cols.id!r} has {null_ids} null values; fix the data, "
            "or remove pool.id_column to identify documents by a hash of their text"
        )
    empty = {"keys": np.uint64, "chars": np.int64, "tokens": np.int64}
    wanted = ["keys", *(f"score:{c}" for c in cols.scores)]
    wanted += ["tokens"] if cols.tokens else []
    wanted += ["chars"] if cols.text in read else []
    arrays = {
        k: np.concatenate(parts[k]) if k in parts else np.zeros(0, dtype=empty.get(k, np.float64))
        for k in wanted
    }
    if "chars" in arrays:
        arrays["text_bytes"] = np.array(int(arrays["chars"].sum()))
    else:
        arrays["text_bytes"] = np.array(
            file_stats(pf, cols.text).text_bytes
        )  # parquet metadata, no data read
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_keys(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


# -- membership (pure) -----------------------------------------------------------------------------
def masks(rules: Rules, a: dict[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    held = holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == EVAL:
            out[name] = held
        elif name == TOKENIZER:
            out[name] = holdout.tokenizer_mask(
                a["keys"], rules.tokenizer_spec, rules.tokenizer_fraction, held
            )
        else:
            out[name] = arm_members(rules.arms[name], rules, a, held)
    return out


# -- text pass (worker) ----------------------------------------------------------------------------
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


def text_pass(
    unit: int,
    pf: PoolFile,
    local: Path,
    keys_npz: Path,
    rules: Rules,
    text_column: str,
    targets: list[Target],
    stage: Path,
) -> dict[str, Any]:
    a = load_keys(keys_npz)
    member = masks(rules, a, [t.name for t in targets])
    stats = route_unit(
        unit,
        iter_columns(pf, [text_column], local=local, types={text_column: pa.string()}),
        a["keys"],
        member,
        a.get("tokens"),
        targets,
        stage,
        pf.name,
    )
    atomic_write_json(stage / "done" / f"{unit:06d}.json", stats)
    return stats


def _prebuilt_read(
    path: Path, id_column: str | None, eval_keys: np.ndarray, eval_text_keys: np.ndarray
) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray]:
    """One prebuilt file: its text, document keys, and which rows are eval docs (by the pool's id
    column when the file has it, else by text hash)."""
    try:
        f = pq.ParquetFile(str(path))
        names = f.schema_arrow.names
        if "text" not in names:
            raise ArmlabError(
                f"{path}: no column 'text' (columns: {', '.join(names)}); a prebuilt arm needs nanochat-format shards"
            )
        use_id = id_column is not None and id_column in names
        table = f.read(columns=["text", id_column] if use_id else ["text"])
    except ArmlabError:
        raise
    except (pa.ArrowException, OSError) as e:
        raise BadFile(str(path), describe_error(e)) from None
    text = table.column("text")
    if use_id:
        keys = doc_keys(table.column(id_column), None)
        return text, keys, np.isin(keys, eval_keys)
    keys = text_keys(text.combine_chunks().cast(pa.string()).to_pylist())
    return text, keys, np.isin(keys, eval_text_keys)


def prebuilt_keys(
    path: Path, id_column: str | None, eval_keys: np.ndarray, eval_text_keys: np.ndarray, out: Path
) -> None:
    """Key pass of one prebuilt file, for max_rows / max_tokens: its non-eval docs' keys and chars."""
    text, keys, held = _prebuilt_read(path, id_column, eval_keys, eval_text_keys)
    chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy().astype(np.int64)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=keys[~held], chars=chars[~held])


def prebuilt_pass(
    unit: int,
    path: Path,
    id_column: str | None,
    eval_keys: np.ndarray,
    eval_text_keys: np.ndarray,
    target: Target,
    stage: Path,
    cap: Threshold | None = None,
    cap_seed: int = 0,
) -> dict[str, Any]:
    """One file of a prebuilt arm: drop eval docs, keep the `cap` sample if any, route the rest."""
    text, keys, held = _prebuilt_read(path, id_column, eval_keys, eval_text_keys)
    member = ~held
    if cap is not None:
        member &= cap.accepts(*cap_rank(keys, cap_seed))
    stats = route_unit(
        unit, [pa.table({"text": text})], keys, {target.name: member}, None, [target], stage, str(path)
    )
    stats[target.name]["eval_removed"] = int(held.sum())
    atomic_write_json(stage / "done" / f"{unit:06d}.json", stats)
    return stats


def merge_target(
    target: Target,
    stage: Path,
    units: list[int],
    total_bytes: int,
    rows_per_shard: int,
    row_group_rows: int,
    compression: str,
    partial: Path,
) -> list[dict[str, Any]]:
    if partial.exists():
        shutil.rmtree(partial)
    writer = ShardWriter(partial, rows_per_shard, row_group_rows, compression)
    files = [stage / target.name / f"{u:06d}.arrow" for u in units]
    merge(files, writer, list(target.columns), total_bytes)
    return writer.close()


# -- the parent ------------------------------------------------------------------------------------
class Runner:
    """Runs units inline (workers=1) or on a process pool, submitting them in order."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None
        if workers > 1:
            # On Linux the workers are forked, all of them now, before this process starts any
            # thread (progress bars, downloads): a fork copies only the forking thread, so forking
            # later could copy a lock some other thread holds. Forked workers start instantly with
            # everything imported; a forkserver would spend ~0.3 s re-importing pyarrow first, and
            # spawn ~1 s per worker. A caller that already runs threads (an app embedding armlab)
            # gets a forkserver; other platforms their default (spawn on macOS, where fork is unsafe).
            linux = sys.platform.startswith("linux")
            method = ("fork" if threading.active_count() == 1 else "forkserver") if linux else None
            ctx = multiprocessing.get_context(method)
            self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init)
            if method == "fork":
                # submit() forks every worker at once under the fork method; wait for them here
                for f in [self.pool.submit(os.getpid) for _ in range(workers)]:
                    f.result()

    def run(
        self,
        tags: list[Any],
        make: Callable[[Any], tuple[Callable[..., Any], tuple[Any, ...]]],
        on_done: Callable[[Any, Any], None],
    ) -> None:
        """For each tag in order: `fn, args = make(tag)` (may block, e.g. on a download), run
        `fn(*args)`, then `on_done(tag, result)` in the parent. At most `workers` run at once."""
        if self.pool is None:
            for tag in tags:
                fn, args = make(tag)
                on_done(tag, fn(*args))
            return
        inflight: dict[Future[Any], Any] = {}
        try:
            for tag in tags:
                fn, args = make(tag)
                inflight[self.pool.submit(fn, *args)] = tag
                while len(inflight) >= self.workers:
                    self._drain(inflight, on_done)
            while inflight:
                self._drain(inflight, on_done)
        except BaseException:
            for f in inflight:
                f.cancel()
            raise

    @staticmethod
    def _drain(inflight: dict[Future[Any], Any], on_done: Callable[[Any, Any], None]) -> None:
        done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        for f in done:
            on_done(inflight.pop(f), f.result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _worker_init() -> None:
    pa.set_cpu_count(1)  # one process per core: Arrow's own thread pool would only contend


def pool_fingerprint(spec: PoolSpec, files: list[PoolFile]) -> str:
    return fingerprint({"pool": spec.model_dump(), "files": [f.describe() for f in files]})


def arm_selection(exp: Experiment, arm: ArmSpec) -> dict[str, Any]:
    sel = arm.model_dump(exclude={"download_mode", "concurrency"})
    if arm.kind == "random":
        sel["semantics"] = "uniform(key, seed) < ratio: each non-eval document independently (binomial size)"
    elif arm.kind == "top":
        sel["semantics"] = (
            f"exactly the top ratio of the non-eval pool by {arm.score_column} ({arm.by}); ties broken by mix(key, seed)"
        )
    elif arm.kind == "sample":
        sel["semantics"] = (
            f"Gumbel top-k: without replacement, P ~ exp({arm.score_column} / temperature), ratio of the non-eval pool ({arm.by})"
        )
    if arm.max_rows or arm.max_tokens:
        sel["cap_semantics"] = (
            "a seeded uniform sample of the arm of at most max_rows rows / max_tokens tokens"
        )
    return sel


def plan_targets(exp: Experiment, wd: Workdir, arms: list[ArmSpec], pool_fp: str) -> list[Target]:
    shards = exp.shards.model_dump()
    common = {"pool_fingerprint": pool_fp, "eval": exp.eval.model_dump(), "shards": shards}
    out = [
        Target(
            EVAL,
            wd.eval_dir,
            exp.eval.seed,
            ("text", "key", "text_key"),
            {"kind": "eval", **exp.eval.model_dump()},
            fingerprint({**common, "target": "eval"}),
        ),
        Target(
            TOKENIZER,
            wd.tokenizer_sample_dir,
            exp.tokenizer.seed,
            ("text",),
            {
                "kind": "tokenizer-sample",
                "train_chars": exp.tokenizer.train_chars,
                "seed": exp.tokenizer.seed,
            },
            fingerprint(
                {**common, "target": "tokenizer", "tok": [exp.tokenizer.train_chars, exp.tokenizer.seed]}
            ),
        ),
    ]
    for arm in arms:
        sel = arm_selection(exp, arm)
        out.append(
            Target(
                arm.name, wd.data_dir(arm.name), arm.seed, ("text",), sel, fingerprint({**common, "arm": sel})
            )
        )
    return out


def needs_work(t: Target, force: bool, overwrite: bool) -> bool:
    """False when `t.out_dir` is already complete from the same spec; refuses unsafe overwrites."""
    mpath = t.out_dir / MANIFEST
    if mpath.is_file():
        m = read_json(mpath)
        if m.get("complete") and m.get("fingerprint") == t.fingerprint:
            return False
        if m.get("complete") and not overwrite:
            diff = fingerprint_diff(m.get("selection", {}), t.selection) or ["pool, eval or shard settings"]
            raise ArmlabError(
                f"{t.out_dir}: holds {t.name!r} prepared from a different spec ({', '.join(diff)} differ); "
                "rerun with --overwrite to replace it"
            )
    check_writable(t.out_dir, force=force, action=f"prepare {t.name!r}")
    return True


def prepare(
    exp: Experiment,
    arms: list[str] | None = None,
    workers: int | None = None,
    force: bool = False,
    overwrite: bool = False,
    skip_bad_files: bool = False,
    keep_cache: bool = False,
    skip_download: bool = False,
) -> dict[str, Path]:
    """Prepare the eval set, the tokenizer sample and the named arms (default all); arm -> data dir."""
    wd = open_workdir(exp)
    chosen = [exp.arm(a) for a in arms] if arms else list(exp.arms)
    workers = max(1, workers or os.cpu_count() or 1)
    pool_arms = [a for a in chosen if a.kind != "prebuilt"]
    prebuilt = [a for a in chosen if a.kind == "prebuilt"]
    runner = Runner(workers)
    try:
        _prepare_pool(exp, wd, pool_arms, runner, force, overwrite, skip_bad_files, keep_cache)
        for arm in prebuilt:
            _prepare_prebuilt(exp, wd, arm, runner, force, overwrite, skip_download)
    finally:
        runner.close()
    return {a.name: wd.data_dir(a.name) for a in chosen}


def _prepare_pool(
    exp: Experiment,
    wd: Workdir,
    arms: list[ArmSpec],
    runner: Runner,
    force: bool,
    overwrite: bool,
    skip_bad_files: bool,
    keep_cache: bool,
) -> None:
    files = list_pool(exp.pool)
    pool_fp = pool_fingerprint(exp.pool, files)
    targets = [t for t in plan_targets(exp, wd, arms, pool_fp) if needs_work(t, force, overwrite)]
    if not targets:
        console.print("prepare: eval set, tokenizer sample and arms are up to date")
        return
    cols = key_columns(exp, arms)
    work = wd.cache_dir / "prepare"
    keys_dir = work / f"keys-{fingerprint([pool_fp, cols.read])}"
    stage = work / f"stage-{fingerprint([pool_fp, [t.fingerprint for t in targets]])}"

    # 1. key pass
    skipped: list[str] = []
    npz = {i: keys_dir / f"{i:06d}.npz" for i in range(len(files))}
    todo = [i for i in range(len(files)) if not npz[i].is_file()]
    bad: dict[int, str] = {}
    with progress() as bar:
        task = bar.add_task("key pass", total=len(files), completed=len(files) - len(todo), unit="files")

        def keyed(i: int, err: str | None) -> None:
            if err is not None:
                bad[i] = err
            bar.update(task, advance=1)

        runner.run(todo, lambda i: (_key_pass_guarded, (files[i], cols, npz[i], skip_bad_files)), keyed)
    for i in sorted(bad):
        console.print(f"[yellow]skipping unreadable pool file[/] {bad[i]}", soft_wrap=True)
        skipped.append(files[i].name)
    live = [i for i in range(len(files)) if i not in bad and npz[i].is_file()]

    # 2. thresholds
    rules, summary = _thresholds(exp, arms, live, npz)
    expected = _count_members(rules, live, npz, [t.name for t in targets])
    for t in targets:
        if t.name not in (EVAL, TOKENIZER) and expected[t.name] == 0:
            raise ArmlabError(
                f"arm {t.name!r} selects no documents from {summary['rows']:,} (ratio {rules.arms[t.name].ratio}); raise its ratio"
            )

    # 3. text pass
    done_dir = stage / "done"
    unit_stats: dict[int, dict[str, Any]] = {}
    for i in live:
        p = done_dir / f"{i:06d}.json"
        if p.is_file():
            unit_stats[i] = read_json(p)
    todo = [i for i in live if i not in unit_stats]
    fetcher = Prefetcher(files, todo, wd.cache_dir / "pool", ahead=runner.workers + 2, keep_cache=keep_cache)
    with progress() as bar:
        done_rows = sum(summary["file_rows"][i] for i in unit_stats)
        task = bar.add_task(
            "select + route", total=summary["rows"], completed=done_rows, unit="docs", bytes=0
        )
        moved = 0

        def make(i: int) -> tuple[Callable[..., Any], tuple[Any, ...]]:
            local = fetcher.get(i)  # waits for this file's download; later ones keep prefetching
            return text_pass, (i, files[i], local, npz[i], rules, exp.pool.text_column, targets, stage)

        def routed(i: int, stats: dict[str, Any]) -> None:
            nonlocal moved
            unit_stats[i] = stats
            fetcher.release(i)
            moved += summary["text_bytes"][i]
            bar.update(task, advance=summary["file_rows"][i], bytes=moved)

        try:
            runner.run(todo, make, routed)
        finally:
            fetcher.close()

    # 4. shuffle + write
    common = {
        "pool_fingerprint": pool_fp,
        "skipped_files": skipped,
        "pool_rows": summary["rows"],
        "eval_cut": f"{rules.eval_cut:016x}",
        "tokens_source": cols.tokens,
    }
    extra = {t.name: dict(common) for t in targets}
    if TOKENIZER in extra:
        extra[TOKENIZER]["tokenizer_fraction"] = rules.tokenizer_fraction
    for name in rules.arms:
        if name in extra:
            th, cap = rules.thresholds.get(name), rules.caps.get(name)
            extra[name]["threshold"] = th.to_json() if th else None
            extra[name]["cap"] = cap.to_json() if cap else None
    _write_targets(exp, runner, targets, stage, live, unit_stats, extra)
    shutil.rmtree(work, ignore_errors=True)  # this run's stage and keys, and any left by older specs


def _key_pass_guarded(pf: PoolFile, cols: Columns, out: Path, skip_bad_files: bool) -> str | None:
    try:
        key_pass(pf, cols, out)
    except BadFile as e:
        if not skip_bad_files:
            raise
        return f"{e.file} ({e.reason})"
    return None


def _thresholds(
    exp: Experiment, arms: list[ArmSpec], live: list[int], npz: dict[int, Path]
) -> tuple[Rules, dict[str, Any]]:
    """Eval cut, tokenizer fraction, arm thresholds and caps: all exact, memory bounded by one file."""
    rows = 0
    small = np.zeros(0, dtype=np.uint64)  # the docs smallest eval hashes so far (bounded memory)
    text_bytes: dict[int, int] = {}
    file_rows: dict[int, int] = {}
    for i in live:
        a = load_keys(npz[i])
        rows += len(a["keys"])
        file_rows[i] = len(a["keys"])
        small = holdout.smallest(
            np.concatenate([small, holdout.eval_hashes(a["keys"], exp.eval)]), exp.eval.docs
        )
        text_bytes[i] = int(a["text_bytes"])
    if rows == 0:
        raise ArmlabError(f"pool {exp.pool.uri!r}: no documents in {len(live)} readable file(s)")
    cut = holdout.eval_cut(small, exp.eval, rows, exp.pool.uri)
    held_rows = 0
    for i in live:
        held_rows += int(holdout.eval_mask(load_keys(npz[i])["keys"], exp.eval, cut).sum())
    total = sum(text_bytes.values())
    frac = holdout.tokenizer_fraction(exp.tokenizer, total * (1 - held_rows / rows))
    rules = Rules(exp.eval, cut, exp.tokenizer, frac, {a.name: a for a in arms})

    def chunks(arm: ArmSpec, by_tokens: bool) -> Callable[[], Iterable[Chunk]]:
        def gen() -> Iterable[Chunk]:
            for i in live:
                a = load_keys(npz[i])
                held = holdout.eval_mask(a["keys"], exp.eval, cut)
                cand, p, s = arm_base(arm, a, held)
                w = weights(a, by_tokens)
                yield p, s, (w[cand] if w is not None else None)

        return gen

    for arm in arms:
        if arm.kind not in ("top", "sample"):
            continue
        total_w, lo, hi = 0.0, np.inf, -np.inf
        for i in live:
            a = load_keys(npz[i])
            held = holdout.eval_mask(a["keys"], exp.eval, cut)
            sc = a[f"score:{arm.score_column}"]
            cand = ~held & ~np.isnan(sc)
            w = weights(a, arm.by == "tokens")
            total_w += float(cand.sum() if w is None else w[cand].sum())
            if cand.any():
                lo, hi = min(lo, float(sc[cand].min())), max(hi, float(sc[cand].max()))
        if arm.kind == "top" and lo == hi:
            raise ArmlabError(
                f"arm {arm.name!r}: score column {arm.score_column!r} is {lo} for every document, so 'top' would be "
                "chosen by the tie-break hash alone; check the column, or use kind = 'random'"
            )
        target = round(arm.ratio * total_w) if arm.by == "rows" else arm.ratio * total_w
        rules.thresholds[arm.name] = rank_threshold(chunks(arm, arm.by == "tokens"), target)

    for arm in arms:
        if arm.max_rows or arm.max_tokens:

            def members(arm: ArmSpec = arm) -> Iterable[dict[str, np.ndarray]]:
                for i in live:
                    a = load_keys(npz[i])
                    m = arm_members(arm, rules, a, holdout.eval_mask(a["keys"], exp.eval, cut), capped=False)
                    yield {k: a[k][m] for k in ("keys", "tokens", "chars") if k in a}

            rules.caps[arm.name] = cap_threshold(arm, members)
    return rules, {"rows": rows, "text_bytes": text_bytes, "file_rows": file_rows}


def _count_members(rules: Rules, live: list[int], npz: dict[int, Path], names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for i in live:
        for name, m in masks(rules, load_keys(npz[i]), names).items():
            counts[name] += int(m.sum())
    return counts


def _write_targets(
    exp: Experiment,
    runner: Runner,
    targets: list[Target],
    stage: Path,
    units: list[int],
    unit_stats: dict[int, dict[str, Any]],
    extra: dict[str, dict[str, Any]],
) -> None:
    """Stage 2 for each target (in parallel), then its manifest and the swap into place."""
    totals = {
        t.name: {"rows": 0, "chars": 0, "tokens": 0, "dropped_empty": 0, "eval_removed": 0} for t in targets
    }
    for u in units:
        for name, st in unit_stats[u].items():
            if name in totals:
                for k, v in st.items():
                    totals[name][k] += v
    for t in targets:
        if t.name not in (EVAL, TOKENIZER) and totals[t.name]["rows"] == 0:
            raise ArmlabError(
                f"arm {t.name!r}: no non-empty documents selected; raise its ratio or check the text column"
            )
    sh = exp.shards

    def make(t: Target) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        partial = t.out_dir.with_name(f".{t.out_dir.name}.partial")
        return merge_target, (
            t,
            stage,
            units,
            totals[t.name]["chars"],
            sh.rows_per_shard,
            sh.row_group_rows,
            sh.compression,
            partial,
        )

    by_name = {t.name: t for t in targets}
    with progress() as bar:
        task = bar.add_task("shuffle + write", total=len(targets), unit="dirs")

        def written(name: str, files: list[dict[str, Any]]) -> None:
            t = by_name[name]
            tot = totals[name]
            manifest = {
                "name": name,
                "rows": sum(f["rows"] for f in files),
                "chars": sum(f["chars"] for f in files),
                "files": files,
                "selection": t.selection,
                "fingerprint": t.fingerprint,
                "shards": exp.shards.model_dump(),
                "dropped_empty": tot["dropped_empty"],
                "shuffle": {"seed": t.shuffle_seed, "order": "ascending mix(key, seed, SALT_SHUFFLE)"},
                **extra[name],
            }
            if tot.get("eval_removed"):
                manifest["eval_removed"] = tot["eval_removed"]
            if extra[name].get("tokens_source"):
                manifest["tokens"] = tot["tokens"]
            else:
                manifest["tokens_estimate"] = round(manifest["chars"] / CHARS_PER_TOKEN)
            finish_dir(t.out_dir.with_name(f".{t.out_dir.name}.partial"), t.out_dir, manifest)
            # Its stage files are spent (a rerun would plan without this target, so a new stage):
            # free their page cache now rather than after the last merge.
            shutil.rmtree(stage / name, ignore_errors=True)
            bar.update(task, advance=1)
            console.print(
                f"prepare: {name}: {manifest['rows']:,} docs, {manifest['chars'] / 1e6:,.1f}M chars, "
                f"{len(files)} shards -> {t.out_dir}",
                soft_wrap=True,
            )

        # Largest first, so with several workers the last merge to finish is a small one.
        order = sorted(targets, key=lambda t: -totals[t.name]["chars"])
        runner.run(order, make, lambda t, files: written(t.name, files))


def _prepare_prebuilt(
    exp: Experiment,
    wd: Workdir,
    arm: ArmSpec,
    runner: Runner,
    force: bool,
    overwrite: bool,
    skip_download: bool,
) -> None:
    eval_manifest = wd.eval_dir / MANIFEST
    if not eval_manifest.is_file():
        raise ArmlabError(
            f"arm {arm.name!r}: the eval set is not prepared yet; run `armlab prepare EXP` without --arm first"
        )
    uri = arm.uri or ""
    if uri.startswith("az://"):
        from armlab.data.blob import fetch_prebuilt

        src = fetch_prebuilt(
            uri,
            wd.arm_dir(arm.name) / "download",
            mode=arm.download_mode,
            concurrency=arm.concurrency,
            skip_download=skip_download,
        )
    else:
        src = Path(os.path.expanduser(uri))
    paths = sorted(src.rglob("*.parquet")) if src.is_dir() else []
    if not paths:
        raise ArmlabError(f"arm {arm.name!r}: uri {uri!r} holds no .parquet files")
    src_fp = fingerprint([[p.name, p.stat().st_size] for p in paths])
    eval_m = read_json(eval_manifest)
    sel = {
        **arm_selection(exp, arm),
        "source_fingerprint": src_fp,
        "semantics": "the prebuilt files minus the eval docs (by id, else by text hash), reshuffled",
    }
    t = Target(
        arm.name,
        wd.data_dir(arm.name),
        arm.seed,
        ("text",),
        sel,
        fingerprint({"arm": sel, "eval": eval_m.get("fingerprint"), "shards": exp.shards.model_dump()}),
    )
    if not needs_work(t, force, overwrite):
        console.print(f"prepare: {arm.name}: up to date")
        return
    ev = read_shards(wd.eval_dir, columns=["key", "text_key"])
    eval_keys = np.sort(ev.column("key").to_numpy())
    eval_text_keys = np.sort(ev.column("text_key").to_numpy())
    stage = wd.cache_dir / "prepare" / f"stage-{t.fingerprint}"
    cap = None
    if arm.max_rows or arm.max_tokens:  # a seeded uniform sample of the files minus the eval docs
        npz = {u: stage / "keys" / f"{u:06d}.npz" for u in range(len(paths))}
        todo_keys = [u for u in range(len(paths)) if not npz[u].is_file()]
        with progress() as bar:
            task = bar.add_task(
                f"{arm.name}: key pass", total=len(paths), completed=len(paths) - len(todo_keys), unit="files"
            )
            runner.run(
                todo_keys,
                lambda u: (prebuilt_keys, (paths[u], exp.pool.id_column, eval_keys, eval_text_keys, npz[u])),
                lambda u, _: bar.update(task, advance=1),
            )
        cap = cap_threshold(arm, lambda: (load_keys(npz[u]) for u in range(len(paths))))
    unit_stats: dict[int, dict[str, Any]] = {}
    todo = []
    for u in range(len(paths)):
        p = stage / "done" / f"{u:06d}.json"
        if p.is_file():
            unit_stats[u] = read_json(p)
        else:
            todo.append(u)
    with progress() as bar:
        task = bar.add_task(
            f"{arm.name}: remove eval + route",
            total=len(paths),
            completed=len(paths) - len(todo),
            unit="files",
        )

        def routed(u: int, stats: dict[str, Any]) -> None:
            unit_stats[u] = stats
            bar.update(task, advance=1)

        runner.run(
            todo,
            lambda u: (
                prebuilt_pass,
                (u, paths[u], exp.pool.id_column, eval_keys, eval_text_keys, t, stage, cap, arm.seed),
            ),
            routed,
        )
    _write_targets(
        exp,
        runner,
        [t],
        stage,
        list(range(len(paths))),
        unit_stats,
        {
            t.name: {
                "source": uri,
                "eval_fingerprint": eval_m.get("fingerprint"),
                **({"cap": cap.to_json()} if cap else {}),
            }
        },
    )
    shutil.rmtree(stage, ignore_errors=True)
