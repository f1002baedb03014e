"""Shuffle and write (per target, in a worker), then the manifest and the swap into place.

`shuffle.merge` streams each target's stage-1 rows in hash order into `shard_00000.parquet ...`
in the target's partial dir; the parent then writes the manifest and swaps the dir into place.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from armlab.data.prepare.executor import Executor
from armlab.data.prepare.stats import StatsSpec, add, manifest_stats
from armlab.data.prepare.targets import EVAL, TOKENIZER, Target
from armlab.data.select import CHARS_PER_TOKEN, SALT_TOKENIZER
from armlab.data.shards import ShardWriter, finish_dir
from armlab.data.shuffle import CHARS, merge
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import ShardSpec
from armlab.text import plural
from armlab.workdir import writing

COUNTS = ("rows", "chars", "tokens", "dropped_empty", "eval_removed")


@dataclass
class CharBudget:
    """Keep documents in order until their chars, each capped at `doc_cap`, reach `chars` (the
    tokenizer sample: counted the way the tokenizer reads it)."""

    doc_cap: int
    chars: int
    used: int = 0

    def __call__(self, rows: pa.Table) -> int:
        if self.used >= self.chars:
            return 0
        capped = np.minimum(rows.column(CHARS).to_numpy(zero_copy_only=False), self.doc_cap)
        cum = self.used + np.cumsum(capped)
        n = min(len(cum), int(np.searchsorted(cum, self.chars, side="left")) + 1)
        self.used = int(cum[n - 1]) if n else self.used
        return n


@dataclass(frozen=True)
class MergeTask:
    """Stage 2 of one target: its stage files of `units`, merged into shards in `target.partial_dir`."""

    target: Target
    stage: Path
    units: list[int]
    total_bytes: int
    shards: ShardSpec
    budget: CharBudget | None = None


@dataclass(frozen=True)
class Merged:
    files: list[dict[str, Any]]
    capped_chars: int | None  # with a budget: the chars it counted


def merge_target(task: MergeTask) -> Merged:
    partial = task.target.partial_dir
    if partial.exists():
        shutil.rmtree(partial)
    sh = task.shards
    writer = ShardWriter(partial, sh.rows_per_shard, sh.row_group_rows, sh.compression, chars_column=CHARS)
    files = [task.stage / task.target.name / f"{u:06d}.arrow" for u in task.units]
    budget = task.budget
    merge(files, writer, [*task.target.columns, CHARS], task.total_bytes, take=budget)
    return Merged(writer.close(), budget.used if budget else None)


def unit_totals(
    targets: list[Target], units: list[int], unit_stats: dict[int, dict[str, Any]]
) -> dict[str, dict[str, int]]:
    """Each target's counts summed over the units."""
    totals = {t.name: dict.fromkeys(COUNTS, 0) for t in targets}
    for u in units:
        for name, st in unit_stats[u].items():
            if name in totals:
                for k in COUNTS:
                    totals[name][k] += st.get(k, 0)
    return totals


def data_stats(
    spec: StatsSpec | None, name: str, units: list[int], unit_stats: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The target's `manifest["stats"]`, summed over its units' counts."""
    counts = None
    for u in units:
        part = unit_stats[u].get(name, {}).get("data")
        if part is not None:
            counts = add(counts, part)
    return manifest_stats(spec, counts)


def swap_into_place(t: Target, manifest: dict[str, Any], force: bool) -> None:
    """Swap the target's partial dir into place with its manifest. An arm's swap holds the arm's
    lock and re-checks its leases under it: a run that took a lease since prepare started
    refuses the swap (its data stays as it was; the rerun resumes from the stage files)."""
    _test_pause(t.name, "swap")
    if t.name in (EVAL, TOKENIZER):
        finish_dir(t.partial_dir, t.out_dir, manifest)
        return
    with writing(
        t.out_dir,
        force=force,
        action=f"replace arm {t.name!r} (prepared data kept; rerun prepare once the run ends)",
    ):
        _test_pause(t.name, "locked")
        finish_dir(t.partial_dir, t.out_dir, manifest)


def _test_pause(name: str, point: str) -> None:
    """Test hook: with ARMLAB_TEST_PAUSE=<point>:<dir>, stop at `point` ("swap": before taking the
    arm's lock, "locked": holding it) until <dir>/go exists, after creating <dir>/<arm>.paused, so
    a test can start a train exactly there."""
    spec = os.environ.get("ARMLAB_TEST_PAUSE", "")
    if not spec.startswith(f"{point}:"):
        return
    d = Path(spec.split(":", 1)[1])
    (d / f"{name}.paused").touch()
    deadline = time.time() + 120
    while not (d / "go").exists() and time.time() < deadline:
        time.sleep(0.02)


def write_targets(
    shards: ShardSpec,
    executor: Executor,
    targets: list[Target],
    stage: Path,
    units: list[int],
    unit_stats: dict[int, dict[str, Any]],
    extra: dict[str, dict[str, Any]],
    force: bool = False,
    budgets: dict[str, CharBudget] | None = None,
    stats_spec: StatsSpec | None = None,
) -> None:
    """Stage 2 for each target (in parallel), then its manifest and the swap into place.
    `budgets`: targets cut at a char budget while written (the tokenizer sample)."""
    budgets = budgets or {}
    totals = unit_totals(targets, units, unit_stats)
    for t in targets:
        tot = totals[t.name]
        if t.name not in (EVAL, TOKENIZER) and tot["rows"] == 0:
            if tot["dropped_empty"]:
                raise ArmlabError(
                    f"arm {t.name!r}: all {tot['dropped_empty']:,} documents it selected have null or empty text; "
                    "check pool.text_column (or the export that wrote the pool)"
                )
            raise ArmlabError(f"arm {t.name!r}: no non-empty documents selected; raise its ratio")

    by_name = {t.name: t for t in targets}
    with progress() as bar:
        rows = sum(totals[t.name]["rows"] for t in targets)  # the tokenizer sample's is an upper bound
        task = bar.add_task("shuffle + write", total=rows, unit="docs", bytes=0)
        moved = 0

        def written(mt: MergeTask, merged: Merged) -> None:
            nonlocal moved
            t, files = mt.target, merged.files
            tot = totals[t.name]
            manifest = {
                "name": t.name,
                "rows": sum(f["rows"] for f in files),
                "chars": sum(f["chars"] for f in files),
                "files": files,
                "selection": t.selection,
                "fingerprint": t.fingerprint,
                "columns": list(t.columns),
                "shards": shards.model_dump(),
                "dropped_empty": tot["dropped_empty"],
                "shuffle": {"seed": t.shuffle_seed, "order": _order(t)},
                **extra[t.name],
            }
            if merged.capped_chars is not None:
                manifest["capped_chars"] = merged.capped_chars
                _say_short_sample(mt, merged.capped_chars)
            if stats_spec is not None and t.name in stats_spec.arms:
                manifest["stats"] = data_stats(stats_spec, t.name, units, unit_stats)
            if tot.get("eval_removed"):
                manifest["eval_removed"] = tot["eval_removed"]
            if extra[t.name].get("tokens_source"):
                manifest["tokens"] = tot["tokens"]
            else:
                manifest["tokens_estimate"] = round(manifest["chars"] / CHARS_PER_TOKEN)
            swap_into_place(t, manifest, force)
            # Its stage files are spent (a rerun would plan without this target, so a new stage):
            # free their page cache now rather than after the last merge.
            shutil.rmtree(stage / t.name, ignore_errors=True)
            moved += tot["chars"]
            bar.update(task, advance=tot["rows"], bytes=moved)
            console.print(
                f"prepare: {t.name}: {plural(manifest['rows'], 'doc')}, {manifest['chars'] / 1e6:,.1f}M chars, "
                f"{plural(len(files), 'shard')} -> {t.out_dir}",
                soft_wrap=True,
            )

        # Largest first, so with several workers the last merge to finish is a small one.
        order = sorted(by_name.values(), key=lambda t: -totals[t.name]["chars"])
        tasks = (
            MergeTask(t, stage, units, totals[t.name]["chars"], shards, budgets.get(t.name)) for t in order
        )
        executor.map(merge_target, tasks, written)


def _order(t: Target) -> str:
    return f"ascending mix(key, seed, {'SALT_TOKENIZER' if t.salt == SALT_TOKENIZER else 'SALT_SHUFFLE'})"


def _say_short_sample(mt: MergeTask, capped: int) -> None:
    b = mt.budget
    if b is not None and capped < 0.9 * b.chars:
        console.print(
            f"[yellow]warning:[/] tokenizer sample: {capped:,} chars (documents capped at {b.doc_cap:,}) of the "
            f"{b.chars:,} asked for: the pool holds less text than that, or shorter documents than its files' "
            "sizes suggested; the tokenizer trains on what there is",
            soft_wrap=True,
        )
