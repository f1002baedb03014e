"""Prebuilt arms: a local dir (or a store URL such as `az://`, fetched by `armlab.data.blob.fetch_prebuilt`) whose files
are the selection. The key pass and thresholds are skipped; eval docs are removed (by id, else by
text hash) and the rows are shuffled and re-sharded like any arm's. `max_rows` / `max_tokens`
keep a seeded uniform sample.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from armlab.data.identity import doc_keys, text_keys
from armlab.data.pool import BadFile, describe_error
from armlab.data.prepare.executor import Executor
from armlab.data.prepare.keys import as_text, load_keys
from armlab.data.prepare.options import PrepareOptions
from armlab.data.prepare.routing import done_marker, route_unit
from armlab.data.prepare.stats import StatsSpec
from armlab.data.prepare.targets import Target, needs_work, prebuilt_target
from armlab.data.prepare.writing import write_targets
from armlab.data.select import Threshold, cap_rank, cap_threshold
from armlab.data.shards import MANIFEST, read_shards
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import ArmSpec, Experiment
from armlab.store import is_remote
from armlab.workdir import Workdir, atomic_path, atomic_write_json, read_json


@dataclass(frozen=True)
class EvalKeys:
    """The eval set's document keys and text keys (sorted), to find eval docs in prebuilt files."""

    keys: np.ndarray
    text_keys: np.ndarray


def _prebuilt_read(
    path: Path, id_column: str | None, ev: EvalKeys
) -> tuple[pa.Array, np.ndarray, np.ndarray]:
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
    text = as_text(str(path), "text", table.column("text").combine_chunks(), "")
    if use_id:
        keys = doc_keys(table.column(id_column), None)
        return text, keys, np.isin(keys, ev.keys)
    keys = text_keys(text)
    return text, keys, np.isin(keys, ev.text_keys)


@dataclass(frozen=True)
class PrebuiltKeyTask:
    path: Path
    id_column: str | None
    ev: EvalKeys
    out: Path


def prebuilt_keys(task: PrebuiltKeyTask) -> None:
    """Key pass of one prebuilt file, for max_rows / max_tokens: its non-eval docs' keys and chars."""
    text, keys, held = _prebuilt_read(task.path, task.id_column, task.ev)
    chars = pc.fill_null(pc.utf8_length(text), 0).to_numpy().astype(np.int64)
    with atomic_path(task.out) as tmp, open(tmp, "wb") as f:
        np.savez(f, keys=keys[~held], chars=chars[~held])


def prebuilt_stats(t: Target) -> StatsSpec:
    """What a prebuilt arm's files allow: document lengths (no pool scores, groups or peers)."""
    return StatsSpec(None, None, None, (t.name,))


@dataclass(frozen=True)
class PrebuiltTask:
    unit: int
    path: Path
    id_column: str | None
    ev: EvalKeys
    target: Target
    stage: Path
    cap: Threshold | None
    cap_seed: int


def prebuilt_pass(task: PrebuiltTask) -> dict[str, Any]:
    """One file of a prebuilt arm: drop eval docs, keep the `cap` sample if any, route the rest."""
    text, keys, held = _prebuilt_read(task.path, task.id_column, task.ev)
    member = ~held
    if task.cap is not None:
        member &= task.cap.accepts(*cap_rank(keys, task.cap_seed))
    t = task.target
    stats = route_unit(
        task.unit, [pa.table({"text": text})], {"keys": keys}, {t.name: member}, [t], task.stage, str(task.path),
        stats_spec=prebuilt_stats(t),
    )  # fmt: skip
    stats[t.name]["eval_removed"] = int(held.sum())
    atomic_write_json(done_marker(task.stage, task.unit), stats)
    return stats


def _source_files(wd: Workdir, arm: ArmSpec, opts: PrepareOptions) -> tuple[str, list[Path]]:
    """The arm's uri and its parquet files (a store URL fetched into the arm's download dir first)."""
    uri = arm.uri or ""
    if is_remote(uri):
        from armlab.data.blob import fetch_prebuilt

        src = fetch_prebuilt(
            uri,
            wd.arm_dir(arm.name) / "download",
            mode=arm.download_mode,
            concurrency=arm.concurrency,
            skip_download=opts.skip_download,
        )
    else:
        src = Path(os.path.expanduser(uri))
    paths = sorted(src.rglob("*.parquet")) if src.is_dir() else []
    if not paths:
        raise ArmlabError(f"arm {arm.name!r}: uri {uri!r} holds no .parquet files")
    return uri, paths


def prepare_prebuilt(
    exp: Experiment, wd: Workdir, arm: ArmSpec, executor: Executor, opts: PrepareOptions
) -> None:
    eval_manifest = wd.eval_dir / MANIFEST
    if not eval_manifest.is_file():
        raise ArmlabError(
            f"arm {arm.name!r}: the eval set is not prepared yet; run `armlab prepare EXP` without --arm first"
        )
    uri, paths = _source_files(wd, arm, opts)
    eval_m = read_json(eval_manifest)
    t = prebuilt_target(exp, wd, arm, paths, eval_m.get("fingerprint"))
    if not needs_work(t, opts.force, opts.overwrite):
        console.print(f"prepare: {arm.name}: up to date")
        return
    ev_table = read_shards(wd.eval_dir, columns=["key", "text_key"])
    ev = EvalKeys(np.sort(ev_table.column("key").to_numpy()), np.sort(ev_table.column("text_key").to_numpy()))
    stage = wd.cache_dir / "prepare" / f"stage-{t.fingerprint}"
    units = list(range(len(paths)))
    cap = None
    if arm.max_rows or arm.max_tokens:  # a seeded uniform sample of the files minus the eval docs
        npz = {u: stage / "keys" / f"{u:06d}.npz" for u in units}
        todo_keys = [u for u in units if not npz[u].is_file()]
        with progress() as bar:
            task = bar.add_task(
                f"{arm.name}: key pass", total=len(paths), completed=len(paths) - len(todo_keys), unit="files"
            )
            executor.map(
                prebuilt_keys,
                (PrebuiltKeyTask(paths[u], exp.pool.id_column, ev, npz[u]) for u in todo_keys),
                lambda _t, _r: bar.update(task, advance=1),
            )
        cap = cap_threshold(arm, lambda: (load_keys(npz[u]) for u in units))
    unit_stats: dict[int, dict[str, Any]] = {}
    todo = []
    for u in units:
        p = done_marker(stage, u)
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

        def routed(pt: PrebuiltTask, stats: dict[str, Any]) -> None:
            unit_stats[pt.unit] = stats
            bar.update(task, advance=1)

        executor.map(
            prebuilt_pass,
            (PrebuiltTask(u, paths[u], exp.pool.id_column, ev, t, stage, cap, arm.seed) for u in todo),
            routed,
        )
    extra = {
        "source": uri,
        "eval_fingerprint": eval_m.get("fingerprint"),
        **({"cap": cap.to_json()} if cap else {}),
    }
    write_targets(
        exp.shards,
        executor,
        [t],
        stage,
        units,
        unit_stats,
        {t.name: extra},
        opts.force,
        stats_spec=prebuilt_stats(t),
    )
    shutil.rmtree(stage, ignore_errors=True)
