"""Shuffle and write (per target, in a worker), then the manifest and the swap into place.

`shuffle.merge` streams each target's stage-1 rows in hash order into `shard_00000.parquet ...`
in the target's partial dir; the parent then writes the manifest and swaps the dir into place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.data.prepare.executor import Executor
from armlab.data.prepare.targets import EVAL, TOKENIZER, Target
from armlab.data.select import CHARS_PER_TOKEN
from armlab.data.shards import ShardWriter, finish_dir
from armlab.data.shuffle import merge
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import ShardSpec

COUNTS = ("rows", "chars", "tokens", "dropped_empty", "eval_removed")


@dataclass(frozen=True)
class MergeTask:
    """Stage 2 of one target: its stage files of `units`, merged into shards in `target.partial_dir`."""

    target: Target
    stage: Path
    units: list[int]
    total_bytes: int
    shards: ShardSpec


def merge_target(task: MergeTask) -> list[dict[str, Any]]:
    partial = task.target.partial_dir
    if partial.exists():
        shutil.rmtree(partial)
    sh = task.shards
    writer = ShardWriter(partial, sh.rows_per_shard, sh.row_group_rows, sh.compression)
    files = [task.stage / task.target.name / f"{u:06d}.arrow" for u in task.units]
    merge(files, writer, list(task.target.columns), task.total_bytes)
    return writer.close()


def unit_totals(
    targets: list[Target], units: list[int], unit_stats: dict[int, dict[str, Any]]
) -> dict[str, dict[str, int]]:
    """Each target's counts summed over the units."""
    totals = {t.name: dict.fromkeys(COUNTS, 0) for t in targets}
    for u in units:
        for name, st in unit_stats[u].items():
            if name in totals:
                for k, v in st.items():
                    totals[name][k] += v
    return totals


def write_targets(
    shards: ShardSpec,
    executor: Executor,
    targets: list[Target],
    stage: Path,
    units: list[int],
    unit_stats: dict[int, dict[str, Any]],
    extra: dict[str, dict[str, Any]],
) -> None:
    """Stage 2 for each target (in parallel), then its manifest and the swap into place."""
    totals = unit_totals(targets, units, unit_stats)
    for t in targets:
        if t.name not in (EVAL, TOKENIZER) and totals[t.name]["rows"] == 0:
            raise ArmlabError(
                f"arm {t.name!r}: no non-empty documents selected; raise its ratio or check the text column"
            )

    by_name = {t.name: t for t in targets}
    with progress() as bar:
        task = bar.add_task("shuffle + write", total=len(targets), unit="dirs")

        def written(mt: MergeTask, files: list[dict[str, Any]]) -> None:
            t = mt.target
            tot = totals[t.name]
            manifest = {
                "name": t.name,
                "rows": sum(f["rows"] for f in files),
                "chars": sum(f["chars"] for f in files),
                "files": files,
                "selection": t.selection,
                "fingerprint": t.fingerprint,
                "shards": shards.model_dump(),
                "dropped_empty": tot["dropped_empty"],
                "shuffle": {"seed": t.shuffle_seed, "order": "ascending mix(key, seed, SALT_SHUFFLE)"},
                **extra[t.name],
            }
            if tot.get("eval_removed"):
                manifest["eval_removed"] = tot["eval_removed"]
            if extra[t.name].get("tokens_source"):
                manifest["tokens"] = tot["tokens"]
            else:
                manifest["tokens_estimate"] = round(manifest["chars"] / CHARS_PER_TOKEN)
            finish_dir(t.partial_dir, t.out_dir, manifest)
            # Its stage files are spent (a rerun would plan without this target, so a new stage):
            # free their page cache now rather than after the last merge.
            shutil.rmtree(stage / t.name, ignore_errors=True)
            bar.update(task, advance=1)
            console.print(
                f"prepare: {t.name}: {manifest['rows']:,} docs, {manifest['chars'] / 1e6:,.1f}M chars, "
                f"{len(files)} shards -> {t.out_dir}",
                soft_wrap=True,
            )

        # Largest first, so with several workers the last merge to finish is a small one.
        order = sorted(by_name.values(), key=lambda t: -totals[t.name]["chars"])
        tasks = (MergeTask(t, stage, units, totals[t.name]["chars"], shards) for t in order)
        executor.map(merge_target, tasks, written)
