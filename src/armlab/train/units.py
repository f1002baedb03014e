"""The loader's work units: every (file, row group) of a data dir, in a fixed order, and the
start-up check that they feed every rank (DESIGN.md invariant 4).

Kept apart from the loader (and free of torch) so that `armlab train`'s refusals, which read only
parquet footers, answer in about a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import xxhash

from armlab.data.check import verify_complete
from armlab.errors import ArmlabError
from armlab.text import plural


@dataclass(frozen=True)
class Unit:
    """One work unit: a row group of a shard file (never empty)."""

    file: int
    row_group: int
    rows: int


def list_units(data_dir: str | Path) -> tuple[list[Path], list[Unit]]:
    """All shard files of a data dir (sorted) and their non-empty row groups, in that fixed order."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ArmlabError(f"{data_dir}: data dir not found; run `armlab prepare EXP --arm ARM` first")
    manifest = data_dir / "manifest.json"
    if manifest.exists():
        try:
            complete = json.loads(manifest.read_text()).get("complete")
        except (OSError, ValueError):
            complete = False
        if not complete:
            raise ArmlabError(
                f"{data_dir}: data is incomplete (manifest.json not complete); rerun `armlab prepare`"
            )
    files = sorted(data_dir.glob("shard_*.parquet"))
    if not files:
        raise ArmlabError(f"{data_dir}: no shard_*.parquet files; run `armlab prepare EXP --arm ARM` first")
    units: list[Unit] = []
    for i, path in enumerate(files):
        try:
            meta = pq.ParquetFile(path).metadata
        except Exception as e:  # pyarrow raises several types for a torn or foreign file
            raise ArmlabError(
                f"{path}: not a readable parquet file ({e}); run `armlab check {data_dir}`"
            ) from None
        if "text" not in meta.schema.names:
            raise ArmlabError(
                f"{path}: no 'text' column (has {', '.join(meta.schema.names)}); re-export this dir"
            )
        units.extend(
            Unit(i, g, meta.row_group(g).num_rows)
            for g in range(meta.num_row_groups)
            if meta.row_group(g).num_rows
        )
    return files, units


def check_feeds(data_dir: str | Path, world_size: int) -> tuple[list[Path], list[Unit]]:
    """Refuse (with the fix) an incomplete data dir, or one with fewer work units than ranks;
    return its units."""
    verify_complete(data_dir)
    files, units = list_units(data_dir)
    if len(units) < world_size:
        rows = sum(u.rows for u in units)
        raise ArmlabError(
            f"{data_dir} has {plural(len(units), 'row group')}, needs >= {world_size} for "
            f"{world_size} ranks: re-shard with `armlab prepare` (shards.row_group_rows <= "
            f"{max(1, rows // world_size)}) or use at most {len(units)} GPUs"
        )
    return files, units


def units_fingerprint(files: list[Path], units: list[Unit]) -> str:
    """Identity of the unit layout, so a saved state is only restored onto the same data."""
    h = xxhash.xxh3_64()
    for u in units:
        h.update(f"{files[u.file].name}:{u.row_group}:{u.rows};".encode())
    return h.hexdigest()
