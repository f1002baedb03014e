"""`armlab score`: every pool file scored by each chosen scorer, resumably, through an executor.

Per scorer: resolve the model (download once, hash), hold the scorer dir's lock, refuse a dir
holding another model's scores (unless overwrite), adopt every sidecar that is already right
(the manifest's, or one a killed run wrote whose footer matches), cut what is left into units
(a file, or row-group ranges of at most UNIT_ROWS rows of a large parquet file), and run them
through `Executor.map` (local worker processes here; helper executors run the same records).
A large file's parts are joined into its sidecar when its last part is done. The manifest is
rewritten every MANIFEST_EVERY_S and when the run ends or stops, so a rerun resumes.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from armlab.data.fetch import FetchPlan, Prefetcher, fetch_plan
from armlab.data.pool import PoolFile, list_pool, parquet_metadata
from armlab.data.prepare.executor import Executor, LocalExecutor, open_executor
from armlab.data.score import models
from armlab.data.score.backends import Hardware, get_backend
from armlab.data.score.sidecar import (
    ScoredFile,
    ScoresManifest,
    concat_parts,
    file_meta,
    identity,
    read_manifest,
    relative_names,
    scorer_dir,
    sidecar_meta,
    sidecar_rel,
)
from armlab.data.score.units import ScoreTask, UnitResult, read_columns, run_score_task, worker_model
from armlab.errors import ArmlabError, Stopped
from armlab.progress import console, progress
from armlab.spec import Experiment, ScorerSpec, fingerprint_diff
from armlab.store.redact import redact
from armlab.text import plural
from armlab.workdir import freeze_spec, hold_lock, open_workdir

UNIT_ROWS = 1 << 18  # a parquet file with more rows is scored in row-group ranges of about this many
MANIFEST_EVERY_S = 10.0
FOOTER_THREADS = 8


@dataclass(frozen=True)
class ScoreOptions:
    workers: int | None = None  # worker processes (default: one per core; hf on CUDA: one per GPU)
    device: str | None = None  # "cpu" | "cuda" (hf); None: CUDA when there is a GPU
    overwrite: bool = False  # replace scores of another model or settings
    keep_cache: bool = False  # keep downloaded pool files
    executor: str | None = None  # "local" | "ray" (None: [prepare] executor)
    ray_address: str | None = None  # the Ray head's host:port (None: [prepare] ray_address)


@dataclass
class Unit:
    file: int  # index into the pool's files
    row_groups: tuple[int, int] | None
    rows: int  # from the footer (-1: unknown until read, jsonl)
    bytes: int  # of the columns read, from the footer (jsonl: the file's size)
    out: Path


@dataclass
class FileWork:
    """A pool file being scored: its units, and which are done."""

    units: list[Unit]
    done: set[int] = field(default_factory=set)
    results: list[UnitResult] = field(default_factory=list)


ExecutorFactory = Callable[[int, str], Executor]  # (workers, device) -> where the units run


def score(
    exp: Experiment,
    names: list[str] | None = None,
    options: ScoreOptions | None = None,
    make_executor: ExecutorFactory | None = None,
) -> dict[str, Path]:
    """Score the pool with the named scorers (default all); scorer -> its scores dir.
    `make_executor(workers, device)`: where the units run (default: this machine's processes)."""
    from armlab.data.prepare.run import stop_on_signals

    opts = options or ScoreOptions()
    if not exp.scorers:
        raise ArmlabError(
            f"experiment {exp.name!r} has no [[scorers]]; add one (see README 'Scoring a pool with a model')"
        )
    chosen = [exp.scorer(n) for n in names] if names else list(exp.scorers)
    on_ray = make_executor is None and (opts.executor or exp.prepare.executor) == "ray"
    cluster = None
    if on_ray:  # sized by the cluster's hardware, checked before any work
        files = list_pool(exp.pool)
        cluster, make_executor = _on_ray(exp, opts, files)
    backends = {s.name: get_backend(s.kind).devices(opts.device, cluster) for s in chosen}  # refuses early
    if not on_ray:
        files = list_pool(exp.pool)
    # every model found (downloaded once) before anything is written: a refused score leaves no workdir
    found = {s.name: models.resolve(s) for s in chosen}
    in_workdir = exp.score.scores_dir is None
    wd = open_workdir(exp, create=in_workdir) if in_workdir else None  # another experiment's: refused
    out = {}
    with stop_on_signals("score"):
        for s in chosen:
            device, slots = backends[s.name]
            out[s.name] = score_one(exp, s, found[s.name], files, opts, device, slots, make_executor)
    if wd is not None:
        freeze_spec(wd, exp)
    return out


def score_one(
    exp: Experiment,
    scorer: ScorerSpec,
    resolved: models.Resolved,
    files: list[PoolFile],
    opts: ScoreOptions,
    device: str,
    slots: int,
    make_executor: ExecutorFactory | None = None,
) -> Path:
    """One scorer over the pool's `files` with its model `resolved` (models.resolve)."""
    directory = scorer_dir(exp, scorer.name)
    ident = identity(scorer, exp, models.ref(scorer))
    with hold_lock(directory / ".lock", f"score {scorer.name!r} in {directory}", wait=True):
        manifest = _open_manifest(exp, scorer, directory, ident, resolved, opts.overwrite)
        names = relative_names(exp.pool.uri, files)
        todo = _adopt(manifest, directory, files, names, scorer.name, ident)
        if not todo:
            manifest.write(directory)
            console.print(
                f"score {scorer.name}: {plural(len(files), 'pool file')} already scored ({directory})"
            )
            return directory
        # CPU: one worker per core (or --workers); CUDA: one per GPU, at most (each claims its own)
        workers = min(opts.workers or slots, slots) if device == "cuda" else opts.workers or slots
        if device == "cpu" and make_executor is None:  # loaded here, shared by the forked workers
            worker_model(scorer, ident, resolved.sha256, device, str(resolved.path))  # (a CUDA parent could not fork)
        executor = (make_executor or _local)(workers, device)
        try:
            _run(
                exp, scorer, files, todo, names, manifest, directory, ident, resolved, executor, opts, device
            )
        except (Stopped, KeyboardInterrupt):
            executor.close(kill=True)
            raise
        finally:
            executor.close()
            manifest.write(directory)
            if device == "cuda":
                from armlab.data.score.backends.hf import release_claims

                release_claims(os.getpid())
    return directory


def _local(workers: int, device: str) -> Executor:
    return LocalExecutor(workers)


def _on_ray(exp: Experiment, opts: ScoreOptions, files: list[PoolFile]) -> tuple[Hardware, ExecutorFactory]:
    """The Ray cluster's hardware (after the checks every Ray run makes: the nodes run armlab and
    see the scores dir and a local pool), and the executor each scorer runs on there: one actor
    per CPU, or per GPU for a scorer on CUDA, each loading the model once."""
    from armlab.data.prepare.ray_executor import cluster_hardware
    from armlab.data.prepare.run import existing_dir, local_pool_file

    address = opts.ray_address or exp.prepare.ray_address
    shared = [existing_dir(exp.scores_path), *local_pool_file(files)]
    cpus, gpus = cluster_hardware(address, shared)

    def make(workers: int, device: str) -> Executor:
        return open_executor("ray", workers, address, gpus=1 if device == "cuda" else 0, actors=True)

    return Hardware(cpus, gpus), make


def _open_manifest(
    exp: Experiment,
    scorer: ScorerSpec,
    directory: Path,
    ident: str,
    resolved: models.Resolved,
    overwrite: bool,
) -> ScoresManifest:
    """The dir's manifest, or a new one; a dir holding another model's scores is refused (or
    emptied with overwrite)."""
    old = read_manifest(directory)
    current = {"name": scorer.name, **scorer.settings()}
    if old is not None and (old.identity != ident or old.model.get("sha256") != resolved.sha256):
        was = f"sha256 {str(old.model.get('sha256'))[:12]}..."
        if old.identity == ident:
            why = f"the model behind {old.model.get('ref')} changed ({was} -> {resolved.sha256[:12]}...)"
        else:
            diff = [k for k in fingerprint_diff(old.scorer, current) if k != "batch_size"]
            what = ", ".join(diff) if diff else "the model's content or the pool's columns"
            why = f"it holds scores of another model or settings ({what} differ; scored with {old.model.get('source')}, {was})"
        if not overwrite:
            raise ArmlabError(
                f"{directory}: {why}; rerun `armlab score EXP --scorer {scorer.name} --overwrite` to replace them"
            )
        for sub in ("files", "parts"):
            shutil.rmtree(directory / sub, ignore_errors=True)
        (directory / "manifest.json").unlink(missing_ok=True)
        old = None
    _, scored = read_columns(scorer, exp.pool)
    pool = {"uri": redact(exp.pool.uri), "id_column": exp.pool.id_column, "columns": scored}
    return old or ScoresManifest(
        scorer=current, identity=ident, model=models.describe(scorer, resolved), pool=pool
    )


def _adopt(
    manifest: ScoresManifest,
    directory: Path,
    files: list[PoolFile],
    names: dict[str, str],
    name: str,
    ident: str,
) -> list[int]:
    """Files whose sidecar is up to date stay (a killed run's are adopted by their footers);
    returns the others' indices."""
    todo = []
    for i, pf in enumerate(files):
        rel = names[pf.name]
        path = directory / sidecar_rel(rel)
        entry = manifest.files.get(rel)
        if entry is not None and entry.identity == pf.identity and path.is_file():
            continue
        if sidecar_meta(path) == file_meta(rel, pf, name, ident):
            t = pq.read_table(path, columns=["score"])
            nan = int(np.isnan(t.column("score").to_numpy()).sum())
            manifest.files[rel] = ScoredFile(pf.identity, t.num_rows, nan, sidecar_rel(rel), "unknown")
            continue
        manifest.files.pop(rel, None)
        todo.append(i)
    return todo


def plan_units(
    files: list[PoolFile],
    todo: list[int],
    columns: list[str],
    fetch: FetchPlan,
    directory: Path,
    names: dict[str, str],
) -> dict[int, FileWork]:
    """Each file's units: row-group ranges of about UNIT_ROWS rows for parquet read in place
    (footers read in parallel), one unit for the rest."""

    def one(i: int) -> FileWork:
        pf, rel = files[i], names[files[i].name]
        final = directory / sidecar_rel(rel)
        if pf.fmt != "parquet" or fetch.downloads(pf, False):
            return FileWork([Unit(i, None, -1, pf.size, final)])
        md = parquet_metadata(pf)
        idx = [c for c in range(md.num_columns) if md.schema.column(c).path.split(".")[0] in columns]
        ranges: list[tuple[int, int, int, int]] = []  # lo, hi, rows, bytes
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            size = sum(rg.column(c).total_compressed_size for c in idx)
            if ranges and ranges[-1][2] + rg.num_rows <= UNIT_ROWS:
                lo, _, r, b = ranges[-1]
                ranges[-1] = (lo, g + 1, r + rg.num_rows, b + size)
            else:
                ranges.append((g, g + 1, rg.num_rows, size))
        if len(ranges) <= 1:
            return FileWork([Unit(i, None, md.num_rows, sum(r[3] for r in ranges), final)])
        parts = directory / "parts" / sidecar_rel(rel).removeprefix("files/")
        return FileWork(
            [Unit(i, (lo, hi), r, b, parts.with_name(f"{parts.name}.{lo}-{hi}")) for lo, hi, r, b in ranges]
        )

    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        return dict(zip(todo, pool.map(one, todo), strict=True))


def _run(
    exp: Experiment,
    scorer: ScorerSpec,
    files: list[PoolFile],
    todo: list[int],
    names: dict[str, str],
    manifest: ScoresManifest,
    directory: Path,
    ident: str,
    resolved: models.Resolved,
    executor: Executor,
    opts: ScoreOptions,
    device: str,
) -> None:
    fetch = fetch_plan(exp.pool, files)
    read, _ = read_columns(scorer, exp.pool)
    work = plan_units(files, todo, read, fetch, directory, names)
    for i, fw in work.items():  # parts a killed run finished
        for j, u in enumerate(fw.units):
            if u.row_groups and sidecar_meta(u.out) == _meta(names, files[i], scorer, ident, u):
                fw.done.add(j)
                fw.results.append(_part_result(u.out))
    pending = [(i, j) for i, fw in work.items() for j in range(len(fw.units)) if j not in fw.done]
    known = all(u.rows >= 0 for fw in work.values() for u in fw.units)
    total = sum(u.rows for fw in work.values() for u in fw.units) if known else None
    fetcher = Prefetcher(
        files, todo, directory / "cache", executor.workers + 2, opts.keep_cache,
        download=lambda f: fetch.downloads(f, False),
    )  # fmt: skip
    t0, last_write, docs = time.monotonic(), time.monotonic(), 0
    with progress() as bar:
        job = bar.add_task(f"score {scorer.name}", total=total, unit="docs", bytes=0)
        done_rows = sum(r.rows for fw in work.values() for r in fw.results)
        bar.update(job, completed=done_rows)
        moved = 0

        def tasks():
            for i, j in pending:
                u = work[i].units[j]
                yield ScoreTask(
                    i, files[i], fetcher.get(i), u.row_groups, scorer, ident, resolved.sha256,
                    exp.pool, device, u.out, _meta(names, files[i], scorer, ident, u), str(resolved.path),
                )  # fmt: skip

        def finished(task: ScoreTask, res: UnitResult) -> None:
            nonlocal moved, last_write, docs
            fw = work[task.unit]
            j = next(j for j, u in enumerate(fw.units) if u.out == task.out)
            fw.done.add(j)
            fw.results.append(res)
            moved += fw.units[j].bytes
            docs += res.rows
            bar.update(job, advance=res.rows, bytes=moved)
            if len(fw.done) == len(fw.units):
                _file_done(manifest, directory, names, files[task.unit], scorer, ident, fw)
                fetcher.release(task.unit)
            if time.monotonic() - last_write >= MANIFEST_EVERY_S:
                manifest.write(directory)
                last_write = time.monotonic()

        try:
            executor.map(run_score_task, tasks(), finished)
        finally:
            fetcher.close()
    seconds = time.monotonic() - t0
    manifest.last_run = {
        "docs": docs,
        "seconds": round(seconds, 3),
        "docs_per_s": round(docs / max(seconds, 1e-9), 1),
        "workers": executor.workers,
        "device": device,
    }
    unscored = sum(f.unscored for f in manifest.files.values())
    console.print(
        f"score {scorer.name}: {plural(len(work), 'pool file')}, {docs:,} docs in {seconds:,.1f}s "
        f"({docs / max(seconds, 1e-9):,.0f} docs/s on {plural(executor.workers, 'worker')}, {device})"
        + (f"; {unscored:,} docs have no score (null text or embedding)" if unscored else ""),
        soft_wrap=True,
    )


def _meta(names: dict[str, str], pf: PoolFile, scorer: ScorerSpec, ident: str, u: Unit) -> dict[str, object]:
    return file_meta(names[pf.name], pf, scorer.name, ident, u.row_groups)


def _part_result(path: Path) -> UnitResult:
    t = pq.read_table(path, columns=["score"])
    return UnitResult(t.num_rows, int(np.isnan(t.column("score").to_numpy()).sum()), "unknown")


def _file_done(
    manifest: ScoresManifest,
    directory: Path,
    names: dict[str, str],
    pf: PoolFile,
    scorer: ScorerSpec,
    ident: str,
    fw: FileWork,
) -> None:
    """All units of a file are scored: join its parts (if any) and record it in the manifest."""
    rel = names[pf.name]
    final = directory / sidecar_rel(rel)
    if len(fw.units) > 1:
        parts = [u.out for u in sorted(fw.units, key=lambda u: u.row_groups or (0, 0))]
        concat_parts(parts, final, file_meta(rel, pf, scorer.name, ident))
        for p in parts:
            p.unlink(missing_ok=True)
    dtypes = sorted({r.dtype for r in fw.results if r.dtype != "unknown"}) or ["unknown"]
    manifest.files[rel] = ScoredFile(
        pf.identity,
        sum(r.rows for r in fw.results),
        sum(r.unscored for r in fw.results),
        sidecar_rel(rel),
        "+".join(dtypes),
    )
