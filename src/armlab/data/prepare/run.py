"""`prepare()`: the passes in order, for every pool target at once, then each prebuilt arm."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from armlab.data.fetch import FetchPlan, Prefetcher, fetch_plan
from armlab.data.pool import PoolFile, check_workdir_outside, list_pool
from armlab.data.prepare.executor import Executor, open_executor
from armlab.data.prepare.keys import (
    Columns,
    KeyDone,
    KeyTask,
    cached_keys,
    key_columns,
    run_key_task,
    stats_score_column,
)
from armlab.data.prepare.options import PrepareOptions
from armlab.data.prepare.prebuilt import prepare_prebuilt
from armlab.data.prepare.routing import TextTask, done_marker, run_text_task
from armlab.data.prepare.stats import StatsSpec, score_edges
from armlab.data.prepare.targets import (
    EVAL,
    TOKENIZER,
    Target,
    key_file_fingerprint,
    needs_work,
    plan_targets,
    pool_changes,
    pool_fingerprint,
    pool_listing,
)
from armlab.data.prepare.thresholds import PoolSummary, compute_rules, count_members
from armlab.data.prepare.writing import CharBudget, write_targets
from armlab.data.score.fresh import Scored, check_scores
from armlab.data.select import Rules
from armlab.data.shuffle import STAGE_FORMAT
from armlab.errors import ArmlabError, Stopped
from armlab.progress import console, progress
from armlab.spec import ArmSpec, Experiment, fingerprint
from armlab.workdir import (
    Workdir,
    atomic_write_json,
    check_writable,
    freeze_spec,
    open_workdir,
    read_json,
    step_lock,
)


def prepare(
    exp: Experiment, arms: list[str] | None = None, options: PrepareOptions | None = None
) -> dict[str, Path]:
    """Prepare the eval set, the tokenizer sample and the named arms (default all); arm -> data dir."""
    opts = options or PrepareOptions()
    # The input first (an unknown arm, a pool path that is not there, an offline hub): a refused
    # prepare must leave no workdir behind, not even an empty one.
    chosen = [exp.arm(a) for a in arms] if arms else list(exp.arms)
    check_workdir_outside(exp.pool, exp.workdir_path)
    files = list_pool(exp.pool)
    pool_arms = [a for a in chosen if a.kind != "prebuilt"]
    scores = check_scores(exp, pool_arms, files)  # an arm on a scorer that has not scored: refused here
    prebuilt = [a for a in chosen if a.kind == "prebuilt"]
    # So is a cluster that cannot run it (Ray missing, unreachable, a node that cannot see the workdir)
    executor = open_prepare_executor(exp, opts, [existing_dir(exp.workdir_path), *local_pool_file(files)])
    try:
        wd = open_workdir(exp)
        with stop_on_signals("prepare"), step_lock(wd, "prepare"):  # a second prepare waits, then finds it done
            try:
                prepare_pool(exp, wd, pool_arms, executor, opts, files, scores)
                for arm in prebuilt:
                    prepare_prebuilt(exp, wd, arm, executor, opts)
            except (Stopped, KeyboardInterrupt):
                executor.close(kill=True)  # stop now; what the workers had half-written is never read
                raise
            finally:
                executor.close()  # an error: let the running units finish, so no temp file is left
            freeze_spec(wd, exp)  # the workdir's data is now this spec's
    finally:
        executor.close()  # refused before the passes (a workdir of another experiment)
    return {a.name: wd.data_dir(a.name) for a in chosen}


def open_prepare_executor(exp: Experiment, opts: PrepareOptions, shared: list[Path]) -> Executor:
    """The executor `[prepare]` names, with the command line's --executor / --ray-address / --workers
    over it. `shared`: the paths every Ray node must see (the workdir, a local pool)."""
    spec = exp.prepare
    kind = opts.executor or spec.executor
    return open_executor(kind, opts.workers or spec.workers, opts.ray_address or spec.ray_address, shared)


def existing_dir(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (a workdir not made yet: where it will be)."""
    path = path.absolute()
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path


def local_pool_file(files: list[PoolFile]) -> list[Path]:
    """A local pool's first file (Ray nodes must see the pool too); remote pools are read by URL."""
    return [Path(f.path) for f in files[:1] if not f.remote]


@contextlib.contextmanager
def stop_on_signals(what: str) -> Iterator[None]:
    """SIGINT / SIGTERM / SIGHUP stop `what` with one line ("stopped; rerun to resume", exit 130)
    instead of a traceback (SIGINT) or silence (SIGTERM). Done units are kept: a rerun resumes."""

    def stop(signum: int, _frame: Any) -> None:
        raise Stopped(f"{what} stopped ({signal.Signals(signum).name}); rerun to resume")

    handled = (signal.SIGTERM, signal.SIGHUP)
    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, stop) for s in handled} if main else {}
    try:
        yield
    except KeyboardInterrupt:
        raise Stopped(f"{what} stopped (SIGINT); rerun to resume") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def prepare_pool(
    exp: Experiment,
    wd: Workdir,
    arms: list[ArmSpec],
    executor: Executor,
    opts: PrepareOptions,
    files: list[PoolFile],
    scores: tuple[dict[str, Scored], list[str]] | None = None,
) -> None:
    """The eval set, the tokenizer sample and the pool arms `arms` from the pool's `files`: key
    pass, thresholds, text pass, shuffle + write. `scores`: `check_scores` (made here if None)."""
    fetch = fetch_plan(exp.pool, files)  # remote parquet: ranged column reads, or whole downloads
    pool_fp = pool_fingerprint(exp.pool, files)
    scored, score_notes = scores if scores is not None else check_scores(exp, arms, files)
    targets = [
        t
        for t in plan_targets(exp, wd, arms, pool_fp, scored)
        if needs_work(t, opts.force, opts.overwrite, files)
    ]
    if not targets:
        console.print("prepare: eval set, tokenizer sample and arms are up to date")
        return
    for note in score_notes:
        console.print(f"prepare: {note}", soft_wrap=True, markup=False)
    if any(t.name == EVAL for t in targets):  # every run of the experiment reads the eval set
        for a in exp.arms:
            check_writable(
                wd.data_dir(a.name), opts.force, "replace the eval set the runs of this experiment read"
            )
    cols = dataclasses.replace(key_columns(exp, arms), scorers=tuple(scored))
    work = wd.cache_dir / "prepare"
    _note_pool_changes(work / "pool.json", files)

    # 1. key pass: cached per file by its content identity (and its scores'), so a changed file is read again
    read = cols.read + [f"scorer:{n}:{sc.identity}" for n, sc in scored.items()]
    npz = {i: work / "keys" / f"{key_file_fingerprint(f, read)}.npz" for i, f in enumerate(files)}
    try:
        bad = _key_pass(files, cols, npz, executor, opts, fetch, wd.cache_dir / "pool", scored)
    except OSError as e:
        raise _disk_full(e, work, None, targets, None) from None
    if opts.skip_bad_files:
        bad.update(_known_bad(work, files))
    while True:
        live = [i for i in range(len(files)) if i not in bad]
        # 2. thresholds (several passes over the key arrays: kept in memory while they fit)
        with cached_keys():
            rules, summary = compute_rules(exp, arms, live, npz)
            need, staged = _check_sizes(exp, rules, summary, targets, live, npz, work)
            score = stats_score_column(exp)
            stats_spec = StatsSpec(
                score,
                score_edges(score, rules, live, npz),
                cols.group,
                tuple(t.name for t in targets if t.name not in (EVAL, TOKENIZER)),
                {n: e for n in scored if (e := score_edges(None, rules, live, npz, key=f"scorer:{n}")) is not None},
            )
        stage_key = [pool_fp, [t.fingerprint for t in targets], sorted(bad), STAGE_FORMAT]
        stage = work / f"stage-{fingerprint(stage_key)}"
        # 3. text pass; a file found unreadable here (invalid UTF-8) is skipped with the thresholds
        # chosen again without it: the arms must be the stated share of the files they come from
        try:
            unit_stats, found = _text_pass(
                exp, wd, files, live, npz, rules, summary, targets, stage, executor, opts, stats_spec, fetch, staged
            )
        except OSError as e:
            raise _disk_full(e, work, stage, targets, need) from None
        if not found:
            break
        for _, reason in sorted(found.items()):
            console.print(
                f"[yellow]skipping unreadable pool file[/] {reason}; choosing the arms again without it",
                soft_wrap=True,
            )
        bad.update(found)
        _record_bad(work, files, bad)

    # 4. shuffle + write
    extra, budgets = _manifest_extras(exp, files, pool_fp, sorted(bad), rules, summary, cols, targets)
    try:
        write_targets(
            exp.shards, executor, targets, stage, live, unit_stats, extra, opts.force, budgets, stats_spec
        )
    except OSError as e:
        raise _disk_full(e, work, stage, targets, need) from None
    shutil.rmtree(work, ignore_errors=True)  # this run's stage and keys, and any left by older specs


def _manifest_extras(
    exp: Experiment,
    files: list[PoolFile],
    pool_fp: str,
    bad: list[int],
    rules: Rules,
    summary: PoolSummary,
    cols: Columns,
    targets: list[Target],
) -> tuple[dict[str, dict[str, Any]], dict[str, CharBudget]]:
    """What each target's manifest records about how it was chosen; the tokenizer sample's budget."""
    common = {
        "pool_fingerprint": pool_fp,
        "skipped_files": [files[i].name for i in bad],
        "pool_rows": summary.rows,
        "eval_cut": f"{rules.eval_cut:016x}",
        "tokens_source": cols.tokens,
        "pool_files": pool_listing(files),
    }
    extra = {t.name: dict(common) for t in targets}
    budgets = {}
    if TOKENIZER in extra:
        cut = rules.tokenizer_cut
        extra[TOKENIZER].update(tokenizer_cut=cut.to_json() if cut else None, doc_cap=exp.tokenizer.doc_cap)
        budgets[TOKENIZER] = CharBudget(exp.tokenizer.doc_cap, exp.tokenizer.train_chars)
    for name in rules.arms:
        if name in extra:
            th, cap = rules.thresholds.get(name), rules.caps.get(name)
            extra[name]["threshold"] = th.to_json() if th else None
            extra[name]["cap"] = cap.to_json() if cap else None
    for t in targets:
        if t.scorer is not None:
            extra[t.name]["scorer"] = t.scorer  # the scores it was selected on
    return extra, budgets


def _key_pass(
    files: list[PoolFile],
    cols: Columns,
    npz: dict[int, Path],
    executor: Executor,
    opts: PrepareOptions,
    fetch: FetchPlan,
    cache: Path,
    scored: dict[str, Scored] | None = None,
) -> dict[int, str]:
    """The key pass of every file not done yet; returns the unreadable ones skipped (unit -> reason)."""
    todo = [i for i in range(len(files)) if not npz[i].is_file()]
    bad: dict[int, str] = {}
    # Downloads only where the store cannot serve ranges (or jsonl); else a no-op.
    key_fetch = Prefetcher(
        files,
        todo,
        cache,
        executor.workers + 2,
        opts.keep_cache,
        download=lambda f: fetch.downloads(f, False),
    )
    with progress() as bar:
        done = len(files) - len(todo)
        task = bar.add_task("key pass", total=len(files), completed=done, unit="files", docs=0, bytes=0)
        docs = nbytes = 0  # this run's: the figures are rates

        def keyed(kt: KeyTask, kd: KeyDone) -> None:
            nonlocal docs, nbytes
            if kd.bad is not None:
                bad[kt.unit] = kd.bad
            key_fetch.release(kt.unit)
            docs, nbytes = docs + kd.rows, nbytes + max(kt.pf.size, 0)  # bytes: the pool files' own
            bar.update(task, advance=1, docs=docs, bytes=nbytes)

        tasks = (
            KeyTask(
                i, files[i], cols, npz[i], opts.skip_bad_files, key_fetch.get(i),
                tuple(sc.sidecar(files[i]) for sc in (scored or {}).values()),
            )
            for i in todo
        )  # fmt: skip
        try:
            executor.map(run_key_task, tasks, keyed)
        finally:
            key_fetch.close()
    for i in sorted(bad):
        console.print(f"[yellow]skipping unreadable pool file[/] {bad[i]}", soft_wrap=True)
    return bad


def _text_pass(
    exp: Experiment,
    wd: Workdir,
    files: list[PoolFile],
    live: list[int],
    npz: dict[int, Path],
    rules: Rules,
    summary: PoolSummary,
    targets: list[Target],
    stage: Path,
    executor: Executor,
    opts: PrepareOptions,
    stats_spec: StatsSpec,
    fetch: FetchPlan,
    staged: dict[str, int],
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """Route every live file not done yet; returns each unit's counts, and the files found
    unreadable (with skip_bad_files; else the error is raised)."""
    unit_stats: dict[int, dict[str, Any]] = {}
    for i in live:
        p = done_marker(stage, i)
        if p.is_file():
            unit_stats[i] = read_json(p)
    todo = [i for i in live if i not in unit_stats]
    bad: dict[int, str] = {}
    fetcher = Prefetcher(
        files,
        todo,
        wd.cache_dir / "pool",
        executor.workers + 2,
        opts.keep_cache,
        download=lambda f: fetch.downloads(f, True),
    )
    with progress() as bar:
        done_rows = sum(summary.file_rows[i] for i in unit_stats)
        task = bar.add_task("select + route", total=summary.rows, completed=done_rows, unit="docs", bytes=0)
        moved = 0

        def text_tasks() -> Iterator[TextTask]:
            for i in todo:
                local = fetcher.get(i)  # waits for a download (files mode); later ones keep prefetching
                yield TextTask(
                    i,
                    files[i],
                    local,
                    npz[i],
                    rules,
                    exp.pool.text_column,
                    targets,
                    stage,
                    opts.skip_bad_files,
                    stats_spec,
                    staged,
                )

        def routed(tt: TextTask, stats: dict[str, Any]) -> None:
            nonlocal moved
            if "bad" in stats:
                bad[tt.unit] = stats["bad"]
            else:
                unit_stats[tt.unit] = stats
            fetcher.release(tt.unit)
            moved += summary.text_bytes[tt.unit]
            bar.update(task, advance=summary.file_rows[tt.unit], bytes=moved)

        try:
            executor.map(run_text_task, text_tasks(), routed)
        finally:
            fetcher.close()
    return unit_stats, bad


def _known_bad(work: Path, files: list[PoolFile]) -> dict[int, str]:
    """Files an interrupted run found unreadable in its text pass, if they are still the same."""
    try:
        recorded = {(n, ident): reason for n, ident, reason in read_json(work / "bad_files.json")}
    except FileNotFoundError:
        return {}
    return {
        i: recorded[(f.name, f.identity)] for i, f in enumerate(files) if (f.name, f.identity) in recorded
    }


def _record_bad(work: Path, files: list[PoolFile], bad: dict[int, str]) -> None:
    atomic_write_json(
        work / "bad_files.json", [[files[i].name, files[i].identity, r] for i, r in sorted(bad.items())]
    )


def _check_sizes(
    exp: Experiment,
    rules: Rules,
    summary: PoolSummary,
    targets: list[Target],
    live: list[int],
    npz: dict[int, Path],
    work: Path,
) -> tuple[int, dict[str, int]]:
    """Refuse arms that select nothing; return the disk the text pass and the shards need (an
    estimate, in bytes), warning when the workdir's filesystem has less free, and each target's
    expected stage-1 bytes."""
    expected = count_members(rules, live, npz, [t.name for t in targets])
    for t in targets:
        if t.name not in (EVAL, TOKENIZER) and expected[t.name] == 0:
            raise ArmlabError(
                f"arm {t.name!r} selects no documents from {summary.rows:,} (ratio {rules.arms[t.name].ratio}); raise its ratio"
            )
    per_doc = sum(summary.text_bytes.values()) / max(summary.rows, 1) + STAGE_ROW_BYTES
    sizes = [expected[t.name] * per_doc for t in targets]
    need = int(sum(sizes) + SHARD_RATIO * max(sizes))  # all stage files + the largest target's shards
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    if free < need:
        console.print(
            f"[yellow]warning:[/] {work}: {_gb(free)} free, prepare needs about {_gb(need)} for its stage "
            "files and shards; it may run out of space",
            soft_wrap=True,
        )
    return need, {t.name: int(size) for t, size in zip(targets, sizes, strict=True)}


STAGE_ROW_BYTES = 24  # per staged row besides its text: the hash, Arrow offsets (and eval keys)
SHARD_RATIO = 0.5  # shard bytes per text byte (zstd), on the safe side


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def _disk_full(
    e: OSError, work: Path, stage: Path | None, targets: list[Target], need: int | None
) -> Exception:
    """ENOSPC / EDQUOT: remove this run's stage files and partial dirs, and name the place and
    the size; any other OSError goes on as it was."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT) and "No space left" not in str(e):
        return e
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    for t in targets:
        shutil.rmtree(t.partial_dir, ignore_errors=True)
    where = Path(e.filename).parent if e.filename else work
    free = shutil.disk_usage(work).free if work.exists() else 0
    size = f"it needs about {_gb(need)} for stage files and shards" if need else "during the key pass"
    return ArmlabError(
        f"{where}: disk full while preparing: {size} ({_gb(free)} free now, stage files removed); "
        "free space or move the workdir, then rerun"
    )


def _note_pool_changes(listing: Path, files: list[PoolFile]) -> None:
    """Say which pool files changed since an interrupted prepare (their keys are read again, and
    the text pass starts over: the thresholds may move), then record the listing."""
    try:
        old = read_json(listing)
    except FileNotFoundError:
        old = None
    changed = pool_changes(old, files)
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        console.print(
            f"prepare: pool file {changed[0]}{more} since the interrupted prepare: "
            "reading its keys again; the text pass starts over",
            soft_wrap=True,
        )
    atomic_write_json(listing, pool_listing(files))
