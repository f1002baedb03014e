"""The shard format (DESIGN.md "File contracts"): writer, manifest, hashes.

A data dir holds `shard_00000.parquet ...` with a `text` column (never null or empty), zstd, row
groups of `row_group_rows`, and `manifest.json` with rows, chars, per-file sha256 and
`complete: true`. Many row groups per file is what lets any world size be fed evenly
(DESIGN.md invariant 4); the playbook's one-group-per-file shards were the multi-GPU hang.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from armlab.errors import ArmlabError
from armlab.workdir import atomic_path, atomic_write_json, cleanup_temp_files, read_json

MANIFEST = "manifest.json"
SHARD_GLOB = "shard_*.parquet"


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The data dir's manifest.json; ArmlabError (naming the dir and the fix) when absent."""
    p = Path(data_dir) / MANIFEST
    try:
        return read_json(p)
    except FileNotFoundError:
        raise ArmlabError(f"{data_dir}: no {MANIFEST}; prepare it with `armlab prepare EXP` first") from None


def shard_paths(data_dir: str | Path) -> list[Path]:
    return sorted(Path(data_dir).glob(SHARD_GLOB))


def read_shards(data_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All shards of a dir as one table, in order (pq.read_table(dir) would trip on manifest.json)."""
    paths = shard_paths(data_dir)
    if not paths:
        raise ArmlabError(f"{data_dir}: no {SHARD_GLOB} files; prepare it with `armlab prepare EXP` first")
    return pa.concat_tables(pq.read_table(p, columns=columns) for p in paths)


class ShardWriter:
    """Streams tables into `shard_00000.parquet ...` of `rows_per_shard` rows each.

    Each shard is written to a temp name and renamed, then hashed; `close()` flushes the last
    (short) shard and returns the `files` list for the manifest. The byte stream is a pure
    function of the rows appended, however they were cut into tables (each row group is written
    from one contiguous piece), so identical rows give identical sha256s.
    """

    def __init__(
        self,
        out_dir: Path,
        rows_per_shard: int,
        row_group_rows: int,
        compression: str = "zstd",
        chars_column: str | None = None,
    ):
        self.out_dir = out_dir
        self.chars_column = chars_column  # a column of each row's characters: summed, not written
        self.rows_per_shard = rows_per_shard
        self.row_group_rows = row_group_rows
        self.compression = None if compression == "none" else compression
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[dict[str, Any]] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard:
            combined = pa.concat_tables(self.pending)
            self._flush(combined.slice(0, self.rows_per_shard))
            rest = combined.slice(self.rows_per_shard)
            self.pending, self.pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def close(self) -> list[dict[str, Any]]:
        if self.pending_rows:
            self._flush(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0
        return self.files

    def _flush(self, table: pa.Table) -> None:
        path = self.out_dir / shard_name(len(self.files))
        if self.chars_column is not None:
            chars = int(pc.sum(table[self.chars_column]).as_py() or 0)
            table = table.drop_columns([self.chars_column])
        else:
            chars = int(pc.sum(pc.utf8_length(table["text"])).as_py() or 0)
        # No dictionary or statistics for text: documents are unique, so both only cost time.
        opts = {"compression": self.compression, "use_dictionary": False, "write_statistics": False}
        with atomic_path(path) as tmp, pq.ParquetWriter(tmp, table.schema, **opts) as w:
            # One row group at a time, each in one piece: where the appended tables were cut would
            # otherwise start a new data page there, changing the bytes (not the rows).
            for off in range(0, table.num_rows, self.row_group_rows):
                group = table.slice(off, self.row_group_rows)
                if any(c.num_chunks > 1 for c in group.columns):
                    group = group.combine_chunks()
                w.write_table(group, row_group_size=self.row_group_rows)
        self.files.append(
            {
                "name": path.name,
                "rows": table.num_rows,
                "row_groups": -(-table.num_rows // self.row_group_rows),
                "chars": chars,
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
        )


def finish_dir(partial: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (complete) into `partial` and swap it into place as `final`.

    `partial` must hold exactly the manifest's files, at their sizes (a leftover temp file, or a
    shard some other writer removed, refuses the swap). On Linux the two dirs are exchanged in
    one rename (renameat2 RENAME_EXCHANGE), so readers see the old complete dir or the new
    complete one, never a missing or mixed one; elsewhere the old dir is moved aside first.
    """
    cleanup_temp_files(partial)
    want = {f["name"]: f.get("bytes") for f in manifest["files"]}
    have = {p.name: p.stat().st_size for p in partial.iterdir() if p.is_file()}
    have.pop(MANIFEST, None)
    wrong = sorted(
        n for n in set(want) | set(have) if n not in have or n not in want or want[n] not in (None, have[n])
    )
    if wrong:
        raise ArmlabError(
            f"{partial}: does not hold the files its manifest lists ({', '.join(wrong[:3])}); "
            "another process wrote here: rerun prepare"
        )
    atomic_write_json(partial / MANIFEST, {**manifest, "complete": True})
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists() and _exchange(partial, final):
        shutil.rmtree(partial)  # now the old dir
        return
    if final.exists():
        final.rename(old)
    partial.rename(final)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where the platform cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))
