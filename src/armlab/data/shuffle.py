"""Global shuffle with bounded memory: a two-stage external shuffle keyed by a seeded hash.

Every selected row carries `h = mix(key, seed, SALT_SHUFFLE)`; the output order is simply the
rows sorted by `h`, so it is a uniform permutation of the arm (any prefix of its shards is a
uniform sample) and a function of the hash alone: identical for any worker count, file
layout or kill/rerun.

Stage 1 (`StageWriter`, one per unit of work and target): the unit's selected rows, in sorted
runs of a few MB of text (`stage_batch_bytes`), are appended as record batches to an uncompressed
Arrow IPC file, written under a temp name and renamed when the unit finishes.
Stage 2 (`merge`): the hash space is cut into 2**b equal ranges sized so that one range of
text fits in memory (`bucket_bits`); for each range in order, the matching slice of every
batch (found by binary search, since batches are sorted, and read zero-copy through a memory
map) is gathered, sorted by `h` (stable, in unit order, so duplicate hashes stay deterministic)
and streamed into the shard writer. Memory is one range plus one shard.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from armlab.data.shards import ShardWriter

# Stage 2 cuts a target's hash space into ranges of BUCKET_BYTES of text (memory: ~2x one range)
# and every stage-1 batch into one slice per range, so its work is O(batches x ranges): both grow
# with the target, at most MAX_PIECES each. Small ones (a 1 GB pool's arms) use small sizes: their
# buffers are then reused by Arrow's allocator instead of faulted in fresh (perf: page zeroing
# was ~15% of prepare's CPU with 64 MB ranges and 8 MB batches; -0.5 CPU-s on 1 GB).
BUCKET_BYTES = (16 << 20, 64 << 20)  # a range's text: at least, at most
STAGE_BATCH_BYTES = (2 << 20, 64 << 20)  # a stage-1 batch's text (held per unit and target): at least, at most
MAX_PIECES = 4096
CHARS = "chars"  # stage-1 column: each document's characters (int32), summed for the manifests
# Part of the stage dir's name: a prepare killed under an older layout (no CHARS column) starts its
# text pass over instead of merging files this version cannot read.
STAGE_FORMAT = 2


class StageWriter:
    """Stage 1 output of one unit for one target: record batches, each sorted by `h`, in an
    uncompressed Arrow IPC file written under a temp name and renamed by `close()`.

    Rows come in file order, in parts of any size; they are held until about `batch_bytes` of text
    (`stage_batch_bytes`), then sorted (stable: equal hashes keep file order) and written as one
    batch. So the number of batches stage 2 cuts into hash ranges follows the text, not the read
    size; the shards do not depend on it (nor on the ranges: `ShardWriter`)."""

    def __init__(self, path: Path, schema: pa.Schema, batch_bytes: int = STAGE_BATCH_BYTES[0]):
        self.path, self.schema, self.batch_bytes = path, schema, batch_bytes
        # unique on shared storage too: a retried unit on another node may write beside this one
        self.tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
        self.writer: pa.ipc.RecordBatchFileWriter | None = None
        self.parts: list[pa.Table] = []
        self.held = 0  # text bytes in `parts`

    def add(self, table: pa.Table) -> None:
        """Append rows (with their `h`, uint64, column) in file order."""
        if table.num_rows == 0:
            return
        self.parts.append(table)
        self.held += table.column("text").nbytes
        if self.held >= self.batch_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self.parts:
            return
        rows = pa.concat_tables(self.parts)
        order = np.argsort(rows.column("h").to_numpy(), kind="stable")
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pa.ipc.new_file(str(self.tmp), self.schema)
        self.writer.write_table(rows.take(order).combine_chunks())
        self.parts, self.held = [], 0

    def close(self) -> None:
        """Write what is held, finish the file (an empty one when the unit selected nothing) and
        rename it into place."""
        self._flush()
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pa.ipc.new_file(str(self.tmp), self.schema)
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _piece(total_bytes: int, bounds: tuple[int, int]) -> int:
    return min(max(total_bytes // MAX_PIECES, bounds[0]), bounds[1])


def stage_batch_bytes(total_bytes: int) -> int:
    """Text per stage-1 batch of a target expected to stage `total_bytes`."""
    return _piece(total_bytes, STAGE_BATCH_BYTES)


def bucket_bits(total_bytes: int) -> int:
    """log2 of the number of hash ranges of a target of `total_bytes` of text."""
    n = max(1, -(-total_bytes // _piece(total_bytes, BUCKET_BYTES)))
    return min(16, (n - 1).bit_length())


def merge(
    files: list[Path],
    writer: ShardWriter,
    columns: list[str],
    total_bytes: int,
    on_rows: Callable[[int, int], None] | None = None,
    take: Callable[[pa.Table], int] | None = None,
) -> None:
    """Stage 2: stream the rows of all stage files into `writer`, sorted by `h`. `take(rows)`,
    if given, says how many of the next rows (in order) to keep; fewer than all ends the merge."""
    maps: list[mmap.mmap] = []
    batches: list[tuple[pa.RecordBatch, np.ndarray]] = []
    for f in files:  # in unit order: ties in h then keep a deterministic order
        with open(f, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        maps.append(mm)
        reader = pa.ipc.open_file(pa.py_buffer(mm))
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            if b.num_rows:
                batches.append((b, b.column("h").to_numpy()))
    bits = bucket_bits(total_bytes)
    starts = [0] * len(batches)  # each batch's first row not merged yet (its rows are sorted)
    try:
        for bucket in range(1 << bits):
            last = bucket == (1 << bits) - 1
            hi = None if last else np.uint64((bucket + 1) << (64 - bits))
            parts, hs = [], []
            for j, (b, h) in enumerate(batches):
                i0 = starts[j]
                i1 = len(h) if hi is None else int(np.searchsorted(h, hi, side="left"))
                if i1 > i0:
                    parts.append(b.slice(i0, i1 - i0))
                    hs.append(h[i0:i1])
                    starts[j] = i1
            if not parts:
                continue
            # One gather straight from the mapped slices (no intermediate concatenated copy), into
            # one chunk: the shard bytes must not depend on how the rows were sliced.
            order = np.argsort(np.concatenate(hs), kind="stable")
            out = pa.Table.from_batches(parts).select(columns).take(order).combine_chunks()
            del parts, hs
            # The bucket is copied out: drop its mapped pages from our resident set (they stay in
            # the page cache), so RSS stays at one bucket however large the arm is.
            for mm in maps:
                mm.madvise(mmap.MADV_DONTNEED)
            n = take(out) if take is not None else out.num_rows
            if n:
                writer.write(out.slice(0, n) if n < out.num_rows else out)
            if on_rows is not None:
                on_rows(n, out.column("text").nbytes)
            if n < out.num_rows:
                break
    finally:
        batches.clear()
        for mm in maps:
            with contextlib.suppress(BufferError):  # arrays still referencing the map keep it alive
                mm.close()
