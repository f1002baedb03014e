"""`prepare()`: the passes in order, for every pool target at once, then each prebuilt arm."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from armlab.data.fetch import Prefetcher, fetch_plan
from armlab.data.pool import list_pool
from armlab.data.prepare.executor import Executor, LocalExecutor
from armlab.data.prepare.keys import KeyTask, key_columns, run_key_task
from armlab.data.prepare.options import PrepareOptions
from armlab.data.prepare.prebuilt import prepare_prebuilt
from armlab.data.prepare.routing import TextTask, done_marker, text_pass
from armlab.data.prepare.targets import EVAL, TOKENIZER, needs_work, plan_targets, pool_fingerprint
from armlab.data.prepare.thresholds import compute_rules, count_members
from armlab.data.prepare.writing import write_targets
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import ArmSpec, Experiment, fingerprint
from armlab.workdir import Workdir, open_workdir, read_json


def prepare(
    exp: Experiment, arms: list[str] | None = None, options: PrepareOptions | None = None
) -> dict[str, Path]:
    """Prepare the eval set, the tokenizer sample and the named arms (default all); arm -> data dir."""
    opts = options or PrepareOptions()
    wd = open_workdir(exp)
    chosen = [exp.arm(a) for a in arms] if arms else list(exp.arms)
    workers = max(1, opts.workers or os.cpu_count() or 1)
    pool_arms = [a for a in chosen if a.kind != "prebuilt"]
    prebuilt = [a for a in chosen if a.kind == "prebuilt"]
    executor = LocalExecutor(workers)
    try:
        prepare_pool(exp, wd, pool_arms, executor, opts)
        for arm in prebuilt:
            prepare_prebuilt(exp, wd, arm, executor, opts)
    finally:
        executor.close()
    return {a.name: wd.data_dir(a.name) for a in chosen}


def prepare_pool(
    exp: Experiment, wd: Workdir, arms: list[ArmSpec], executor: Executor, opts: PrepareOptions
) -> None:
    """The eval set, the tokenizer sample and the pool arms `arms`: key pass, thresholds, text
    pass, shuffle + write."""
    files = list_pool(exp.pool)
    fetch = fetch_plan(exp.pool, files)  # remote parquet: ranged column reads, or whole downloads
    pool_fp = pool_fingerprint(exp.pool, files)
    targets = [t for t in plan_targets(exp, wd, arms, pool_fp) if needs_work(t, opts.force, opts.overwrite)]
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
    cache, ahead = wd.cache_dir / "pool", executor.workers + 2
    # Downloads only where the store cannot serve ranges (or jsonl); else a no-op.
    key_fetch = Prefetcher(
        files, todo, cache, ahead, opts.keep_cache, download=lambda f: fetch.downloads(f, False)
    )
    with progress() as bar:
        task = bar.add_task("key pass", total=len(files), completed=len(files) - len(todo), unit="files")

        def keyed(kt: KeyTask, err: str | None) -> None:
            if err is not None:
                bad[kt.unit] = err
            key_fetch.release(kt.unit)
            bar.update(task, advance=1)

        tasks = (KeyTask(i, files[i], cols, npz[i], opts.skip_bad_files, key_fetch.get(i)) for i in todo)
        try:
            executor.map(run_key_task, tasks, keyed)
        finally:
            key_fetch.close()
    for i in sorted(bad):
        console.print(f"[yellow]skipping unreadable pool file[/] {bad[i]}", soft_wrap=True)
        skipped.append(files[i].name)
    live = [i for i in range(len(files)) if i not in bad and npz[i].is_file()]

    # 2. thresholds
    rules, summary = compute_rules(exp, arms, live, npz)
    expected = count_members(rules, live, npz, [t.name for t in targets])
    for t in targets:
        if t.name not in (EVAL, TOKENIZER) and expected[t.name] == 0:
            raise ArmlabError(
                f"arm {t.name!r} selects no documents from {summary.rows:,} (ratio {rules.arms[t.name].ratio}); raise its ratio"
            )

    # 3. text pass
    unit_stats: dict[int, dict[str, Any]] = {}
    for i in live:
        p = done_marker(stage, i)
        if p.is_file():
            unit_stats[i] = read_json(p)
    todo = [i for i in live if i not in unit_stats]
    fetcher = Prefetcher(
        files, todo, cache, ahead, opts.keep_cache, download=lambda f: fetch.downloads(f, True)
    )
    with progress() as bar:
        done_rows = sum(summary.file_rows[i] for i in unit_stats)
        task = bar.add_task(
            "select + route", total=summary.rows, completed=done_rows, unit="docs", bytes=0
        )
        moved = 0

        def text_tasks() -> Any:
            for i in todo:
                local = fetcher.get(i)  # waits for a download (files mode); later ones keep prefetching
                yield TextTask(i, files[i], local, npz[i], rules, exp.pool.text_column, targets, stage)

        def routed(tt: TextTask, stats: dict[str, Any]) -> None:
            nonlocal moved
            unit_stats[tt.unit] = stats
            fetcher.release(tt.unit)
            moved += summary.text_bytes[tt.unit]
            bar.update(task, advance=summary.file_rows[tt.unit], bytes=moved)

        try:
            executor.map(text_pass, text_tasks(), routed)
        finally:
            fetcher.close()

    # 4. shuffle + write
    common = {
        "pool_fingerprint": pool_fp,
        "skipped_files": skipped,
        "pool_rows": summary.rows,
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
    write_targets(exp.shards, executor, targets, stage, live, unit_stats, extra)
    shutil.rmtree(work, ignore_errors=True)  # this run's stage and keys, and any left by older specs
