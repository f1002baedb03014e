"""Column-pruned reads of remote parquet: only the column chunks a pass needs, fetched as
coalesced ranged requests through the storage seam (each retried on its own, each checked to be
of the version listed), a few row groups ahead of the decoder.
Memory: the needed bytes of those few row groups; nothing touches disk.

The byte ranges are the ones pyarrow's reader reads itself (`ComputeColumnChunkRange` in
parquet/file_reader.cc): a column chunk starts at its dictionary page when it has one, else at
its first data page, and spans total_compressed_size bytes, plus the 100 bytes that reader adds
for files from old parquet-mr writers (PARQUET-816). The first request takes the file's last
64 KiB, as pyarrow's footer read does (kDefaultFooterReadSize), so the footer is parsed from
memory. pyarrow then decodes from `KnownRanges`, which refuses any read outside the fetched
ranges: a planning mistake fails loudly instead of decoding zeros. The decoded tables are those
of a local read of the same file, byte for byte.

Coalescing is pyarrow's own pre-buffering rule (`CacheOptions`: holes up to 8 KiB are read
through, since a small hole costs less than a request); merged ranges above MAX_REQUEST are split
into pieces fetched in parallel, so a retry after a dropped connection costs at most one piece.
pyarrow itself then reads with pre_buffer off: the bytes are in memory already, and its own
coalescing would ask for holes between the chunks (even across row groups).
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.errors import ArmlabError
from armlab.store import open_store

if TYPE_CHECKING:
    from armlab.data.pool import PoolFile

FOOTER_READ = 64 << 10
CHUNK_PAD = 100
MAX_GAP = 8 << 10
MAX_REQUEST = 8 << 20
AHEAD = 2  # row groups fetched while one is decoded
THREADS = 4  # requests in flight per file
TAILS_KEPT = 8  # footers kept per process: a pass that opens a file twice fetches its tail once

_TAILS: OrderedDict[tuple[str, int, str], tuple[int, bytes]] = OrderedDict()


class OutsideFetched(OSError):
    """pyarrow asked for bytes that were not fetched (a bug in the range plan, never bad data)."""


class KnownRanges(io.RawIOBase):
    """A read-only, seekable file of `size` bytes of which only some ranges are known."""

    def __init__(self, name: str, size: int):
        super().__init__()
        self.name_, self.size, self.pos = name, size, 0
        self.parts: dict[int, bytes] = {}

    def add(self, start: int, data: bytes) -> None:
        self.parts[start] = data

    def drop(self, start: int) -> None:
        self.parts.pop(start, None)

    def covers(self, start: int, end: int) -> bool:
        return any(s <= start and end <= s + len(d) for s, d in self.parts.items())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        for s, d in self.parts.items():
            if s <= self.pos and end <= s + len(d):
                out = d[self.pos - s : end - s]
                self.pos = end
                return out
        raise OutsideFetched(f"{self.name_}: read of bytes {self.pos}-{end} outside the fetched ranges")

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class Span:
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def leaf_indices(md: pq.FileMetaData, columns: list[str]) -> list[int]:
    """The leaf (physical) columns of the top-level `columns` (a list or struct has several)."""
    wanted = set(columns)
    return [i for i in range(md.num_columns) if md.schema.column(i).path.split(".")[0] in wanted]


def chunk_spans(md: pq.FileMetaData, columns: list[str], row_group: int, file_size: int) -> list[Span]:
    """The byte ranges pyarrow reads for `columns` of one row group (see the module doc)."""
    rg = md.row_group(row_group)
    out = []
    for i in leaf_indices(md, columns):
        c = rg.column(i)
        start = c.data_page_offset
        if c.has_dictionary_page and 0 < c.dictionary_page_offset < start:
            start = c.dictionary_page_offset
        out.append(Span(start, min(file_size, start + c.total_compressed_size + CHUNK_PAD)))
    return out


def coalesce(spans: list[Span], max_gap: int = MAX_GAP) -> list[Span]:
    """Sorted, merged where the gap between two is at most `max_gap`."""
    out: list[Span] = []
    for s in sorted(spans, key=lambda s: s.start):
        if out and s.start - out[-1].end <= max_gap:
            out[-1] = Span(out[-1].start, max(out[-1].end, s.end))
        else:
            out.append(s)
    return out


def pieces(span: Span, max_request: int = MAX_REQUEST) -> list[Span]:
    n = max(1, -(-span.size // max_request))
    step = -(-span.size // n)
    return [Span(a, min(span.end, a + step)) for a in range(span.start, span.end, step)]


class RemoteParquet:
    """One remote parquet file, opened with a single ranged read of its tail."""

    def __init__(self, pf: PoolFile):
        assert pf.protocol is not None
        self.pf, self.entry = pf, pf.entry
        self.store = open_store(self.entry.url)
        if self.entry.size < 0:  # a listing without sizes: ask (the version stays the listed one)
            self.entry = replace(self.entry, size=self.store.info(self.entry.url).size)
        if self.entry.size < 0:
            raise ArmlabError(
                f"{pf.name}: the server does not give this file's size (no Content-Length), so it can be "
                "neither read in ranges nor verified; serve it with one"
            )
        size = self.size = self.entry.size
        self.src = KnownRanges(pf.name, size)
        self.fetched = 0  # bytes received, for the benches and `plan`
        key = (pf.path, size, pf.identity)
        if key not in _TAILS:
            _TAILS[key] = self._read_tail()
            while len(_TAILS) > TAILS_KEPT:
                _TAILS.popitem(last=False)
        start, data = _TAILS[key]
        self.tail = Span(start, size)
        self.src.add(start, data)
        self.file = pq.ParquetFile(self.src, pre_buffer=False)
        self.metadata = self.file.metadata

    def _read_tail(self) -> tuple[int, bytes]:
        tail = Span(max(0, self.size - FOOTER_READ), self.size)
        data = self._get(tail)
        if self.size < 12 or data[-4:] != b"PAR1":
            raise pa.ArrowInvalid("not a parquet file (no PAR1 magic at its end)")
        need = int.from_bytes(data[-8:-4], "little") + 8
        if need > tail.size:  # a footer longer than the first read: fetch the rest before it
            head = Span(max(0, self.size - need), tail.start)
            return head.start, self._get(head) + data
        return tail.start, data

    def _get(self, span: Span) -> bytes:
        data = self.store.read(self.entry, span.start, span.end)
        self.fetched += len(data)
        return data

    def plan(self, columns: list[str], row_group: int) -> list[Span]:
        """The requests for `columns` of one row group: what the tail read did not already bring."""
        spans = coalesce(chunk_spans(self.metadata, columns, row_group, self.size))
        return [s for s in spans if not self.src.covers(s.start, s.end)]

    def planned_bytes(self, columns: list[str]) -> int:
        """Bytes this file costs to read `columns` of every row group, the tail read included."""
        return self.tail.size + sum(
            s.size for rg in range(self.metadata.num_row_groups) for s in self.plan(columns, rg)
        )

    def _fetch(self, pool: ThreadPoolExecutor, spans: list[Span]) -> list[tuple[int, list[Future[bytes]]]]:
        return [(s.start, [pool.submit(self._get, p) for p in pieces(s)]) for s in spans]

    def row_groups(
        self, columns: list[str], ahead: int = AHEAD, groups: tuple[int, int] | None = None
    ) -> Iterator[pa.Table]:
        """`columns` of each row group in order (`groups`: only those of [lo, hi)), fetching up to
        `ahead` row groups in advance."""
        lo, n = groups if groups is not None else (0, self.metadata.num_row_groups)
        with ThreadPoolExecutor(THREADS) as pool:
            pending: dict[int, list[tuple[int, list[Future[bytes]]]]] = {}
            try:
                for i in range(lo, n):
                    for j in range(i, min(n, i + 1 + ahead)):
                        if j not in pending:
                            pending[j] = self._fetch(pool, self.plan(columns, j))
                    parts = pending.pop(i)
                    for start, futs in parts:
                        self.src.add(start, b"".join(f.result() for f in futs))
                    yield self.file.read_row_group(i, columns=columns, use_threads=False)
                    for start, _ in parts:
                        if start != self.tail.start:
                            self.src.drop(start)
            finally:
                for parts in pending.values():
                    for _, futs in parts:
                        for f in futs:
                            f.cancel()

    def read(self, columns: list[str]) -> pa.Table:
        """`columns` of the whole file in one go (small columns: every request in flight at once)."""
        with ThreadPoolExecutor(THREADS) as pool:
            parts = [
                p
                for rg in range(self.metadata.num_row_groups)
                for p in self._fetch(pool, self.plan(columns, rg))
            ]
            for start, futs in parts:
                self.src.add(start, b"".join(f.result() for f in futs))
        return self.file.read(columns=columns, use_threads=False)
