"""Open a pool by URI: list its files (with their content identity), read only the columns needed.

A pool URI is a local file, dir or glob (`/data/pool/*.parquet`), or a store URL (the storage
seam, `armlab.store`): `hf://datasets/<repo>/<glob>` for the Hugging Face hub (HF_TOKEN is read
from the environment by huggingface_hub itself and never logged), `http(s)://`, `az://container/
prefix`, or any other fsspec protocol (`file://...` exercises the remote path without a network).
Every remote read is of the version listed (`armlab.store`): a file replaced between listing and
reading is refused, never mixed into the arms.

Remote parquet read in place is column-pruned (`armlab.data.ranged`): a pass fetches only the
column chunks it needs (the key pass ids, scores and token counts; the text pass the text).
Which files are downloaded whole instead, and the download cache, are `armlab.data.fetch`.

How a remote pool is listed: `hf://datasets/<repo>/<glob>` by the hub's tree API at one commit
(with the LFS sha256 of each file); `http(s)://host/dir/` by the links of the server's directory
index page (nginx `autoindex on`, Apache, `python -m http.server` all serve one), optionally with
a glob (`http://host/pool/**/*.parquet`), then one HEAD a file for its size and ETag; a single
file URL is a pool of one file; `az://` by the container's blob listing. Other fsspec protocols
list as their filesystem does.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from armlab.data.ranged import RemoteParquet
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec
from armlab.store import Entry, RangesIgnored, open_store, redact
from armlab.store.http import strip_query

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
JSON_BLOCK_BYTES = 8 << 20  # jsonl is parsed a block at a time; a longer line retries with bigger blocks
JSON_MAX_BLOCK_BYTES = 1 << 30


@dataclass(frozen=True)
class PoolFile:
    """One file of the pool: `path` is local, or an fsspec path on `protocol` when remote."""

    path: str
    size: int
    fmt: str  # "parquet" | "jsonl"
    protocol: str | None = None  # None: local file
    identity: str = ""  # the file's content identity (`local_identity`, or the store's version)
    shown: str = ""  # how the store names it, when not its URL (a hub file read at a pinned commit)

    @property
    def remote(self) -> bool:
        return self.protocol is not None

    @property
    def name(self) -> str:
        """How the file is shown (messages, manifests, fingerprints): its URI without credentials."""
        if not self.remote:
            return self.path
        return self.shown or redact(self.path if "://" in self.path else f"{self.protocol}://{self.path}")

    @property
    def entry(self) -> Entry:
        """The remote file as the store listed it (reads of it are checked against that version)."""
        url = self.path if "://" in self.path else f"{self.protocol}://{self.path}"
        return Entry(url, self.size, self.identity, name=self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size}


def file_format(path: str, declared: str = "auto") -> str | None:
    if declared != "auto":
        return declared
    low = path.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def split_uri(uri: str) -> tuple[str | None, str]:
    """`hf://datasets/x/*.parquet` -> ("hf", "datasets/x/*.parquet"); a local path -> (None, path)."""
    if "://" in uri:
        protocol, rest = uri.split("://", 1)
        return protocol, rest
    return None, os.path.expanduser(os.path.expandvars(uri))


# Files a dir or glob listing never takes as pool files: dot/underscore names (`.lease`, Spark's
# `_SUCCESS`, `_metadata`) and the manifest armlab writes beside its own shards.
SKIP_NAMES = ("manifest.json",)


def _listable(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return not name.startswith((".", "_")) and name not in SKIP_NAMES


def list_pool(spec: PoolSpec) -> list[PoolFile]:
    """The pool's files in a stable (sorted) order; ArmlabError naming the URI when there are none."""
    protocol, path = split_uri(spec.uri)
    files: list[PoolFile] = []
    if protocol is None:
        p = Path(path)
        if p.is_file():
            candidates = [str(p)]
        else:
            found = p.rglob("*") if p.is_dir() else map(Path, glob.glob(path, recursive=True))
            rel = (lambda q: q.relative_to(p).parts) if p.is_dir() else (lambda q: (q.name,))
            candidates = sorted(str(q) for q in found if all(map(_listable, rel(q))))
        for c in candidates:
            fmt = file_format(c, spec.format)
            if fmt and Path(c).is_file():
                files.append(PoolFile(c, os.path.getsize(c), fmt, identity=local_identity(c, fmt)))
    else:
        root = _glob_root(redact(strip_query(spec.uri)))
        for e in open_store(spec.uri).list(spec.uri):
            name = strip_query(e.shown)
            rel = name[len(root) :] if name.startswith(root) else name.rsplit("/", 1)[-1]
            fmt = file_format(name, spec.format)
            if fmt and all(map(_listable, rel.strip("/").split("/"))):
                files.append(PoolFile(e.url, e.size, fmt, protocol, e.version, e.name))
    if not files:
        raise ArmlabError(
            f"pool.uri {redact(spec.uri)!r}: no parquet or jsonl(.gz/.zst) files found; check the path or glob"
        )
    return files


def check_workdir_outside(spec: PoolSpec, workdir: Path) -> None:
    """Refuse a workdir inside a local pool's dir: from the second prepare on, the listing would
    take the workdir's own shards for pool files."""
    protocol, path = split_uri(spec.uri)
    if protocol not in (None, "file") or Path(path).is_file():
        return
    root, wd = Path(_glob_root(path) or "/").resolve(), workdir.expanduser().resolve()
    if wd == root or root in wd.parents:
        raise ArmlabError(
            f"workdir {workdir} is inside the pool dir {root} (pool.uri {redact(spec.uri)!r}): prepare would "
            "read its own shards as pool files; set workdir in the experiment file to a dir outside the pool"
        )


def deleted(pf: PoolFile) -> ArmlabError:
    return ArmlabError(
        f"{pf.name}: deleted while prepare ran (it was listed at the start); restore it, or rerun "
        "prepare to list the pool again (the arms are then chosen without it)"
    )


def _glob_root(uri: str) -> str:
    """The part of a URI before its first glob character, up to the last "/" before it."""
    magic = glob.has_magic(uri.split("://", 1)[-1])
    root = uri[: min((uri.find(c) for c in "*?[" if c in uri), default=len(uri))]
    return (root.rsplit("/", 1)[0] if magic else root).rstrip("/")


# -- content identity ------------------------------------------------------------------------------
# What a fingerprint of the pool covers for each file, so that a file rewritten in place (re-scored,
# re-exported, even at the same size) invalidates what was derived from it, while a rerun over
# unchanged files costs no more than a listing (and, for local parquet, one footer read a file).
SAMPLE_BYTES = 64 << 10  # head and tail hashed for files without a footer


def local_identity(path: str, fmt: str) -> str:
    """Local parquet: `pq:<size>:<sha256 of the footer>`. The footer holds every column chunk's
    offsets, sizes and statistics, so new contents change it unless every chunk kept its exact
    compressed size and statistics; copying the file (new mtime) keeps it. Other files (jsonl, or
    parquet without a readable footer): `stat:<size>:<mtime_ns>:<sha256 of head and tail>`."""
    st = os.stat(path)
    with open(path, "rb") as f:
        if fmt == "parquet" and st.st_size >= 12:
            f.seek(st.st_size - 8)
            tail = f.read(8)
            n = int.from_bytes(tail[:4], "little")
            if tail[4:] == b"PAR1" and n + 12 <= st.st_size:
                f.seek(st.st_size - 8 - n)
                return f"pq:{st.st_size}:{hashlib.sha256(f.read(n)).hexdigest()[:32]}"
        h = hashlib.sha256(f.read(SAMPLE_BYTES))
        if st.st_size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, st.st_size - SAMPLE_BYTES))
            h.update(f.read(SAMPLE_BYTES))
    return f"stat:{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:32]}"


# -- reading ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_source(pf: PoolFile, local: Path | None = None) -> Iterator[Any]:
    """A readable source for pyarrow: the local path, or a seekable remote file (ranged reads of
    the version listed)."""
    if local is not None or not pf.remote:
        yield str(local or pf.path)
    else:
        with io.BufferedReader(open_store(pf.entry.url).reader(pf.entry), buffer_size=8 << 20) as f:
            yield f


def missing_columns(pf: PoolFile, names: list[str], wanted: list[str], fix: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ArmlabError(f"{pf.name}: no column {missing[0]!r} (columns: {', '.join(names)}); {fix}")


def parquet_columns_check(pf: PoolFile, schema: pa.Schema, columns: list[str]) -> None:
    missing_columns(pf, schema.names, columns, "fix the column name in [pool] or the arm")


def jsonl_stream(src: Any, pf: PoolFile) -> pa.NativeFile:
    """A jsonl pool file's text stream, decompressed by its suffix (.gz, .zst)."""
    path = strip_query(pf.name)
    compression = "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else None
    return pa.input_stream(src, compression=compression)


def _json_type(value: Any, wanted: pa.DataType | None) -> pa.DataType:
    """The type to parse a jsonl column as, from its value in the first record: `wanted` where
    they agree in kind (a score of 2 is still a float), else what the record holds, so a wrong
    type (a string score) still reaches the caller's check."""
    if isinstance(value, bool):
        seen = pa.bool_()
    elif isinstance(value, int):
        seen = pa.int64()
    elif isinstance(value, float):
        seen = pa.float64()
    elif isinstance(value, str):
        seen = pa.string()
    elif value is None:
        return wanted or pa.null()
    else:
        return wanted or pa.string()  # an object or a list: parsing fails, naming the file
    if wanted is None or seen == wanted:
        return seen
    numbers = (pa.int64(), pa.float64())
    return wanted if seen in numbers and wanted in numbers else seen


def _jsonl_tables(
    pf: PoolFile, local: Path | None, columns: list[str], expect: list[str], types: dict[str, pa.DataType]
) -> Iterator[pa.Table]:
    """Stream `columns` of a jsonl file a block (JSON_BLOCK_BYTES) at a time.

    The first record names the fields and their types; the file is then read with an explicit
    schema of just `columns`, so fields that are not read may change type or appear late without
    failing the parse, and memory is one block however large the file."""
    with open_source(pf, local) as src, jsonl_stream(src, pf) as stream:
        buf, line = b"", b""
        while not line.strip():
            chunk = stream.read(1 << 16)
            if not chunk:
                line = buf  # a last line without a newline, or nothing
                break
            buf += chunk
            if b"\n" in chunk:  # the first non-blank complete line, if there is one yet
                line = next((x for x in buf.split(b"\n")[:-1] if x.strip()), b"")
    if not line.strip():
        return  # no documents
    first = json.loads(line)
    if not isinstance(first, dict):
        raise ValueError("the first line is not a JSON object")
    missing_columns(pf, list(first), [*columns, *expect], "fix the column name in [pool]")
    schema = pa.schema([(c, _json_type(first[c], types.get(c))) for c in columns])
    parse = pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    block, done = JSON_BLOCK_BYTES, 0  # rows handed out so far
    while True:
        try:
            with open_source(pf, local) as src:
                reader = pajson.open_json(
                    jsonl_stream(src, pf),
                    read_options=pajson.ReadOptions(block_size=block),
                    parse_options=parse,
                )
                seen = 0
                for batch in reader:
                    seen += batch.num_rows
                    if seen > done:  # after a retry, skip the rows already handed out
                        table = pa.Table.from_batches([batch], schema=schema)
                        yield table.slice(batch.num_rows - (seen - done))
                        done = seen
            return
        except pa.ArrowInvalid as e:
            if "straddl" not in str(e) or block >= JSON_MAX_BLOCK_BYTES:
                raise
            block *= 8  # a line longer than the block: read the file again with bigger blocks


def iter_columns(
    pf: PoolFile,
    columns: list[str],
    expect: tuple[str, ...] = (),
    local: Path | None = None,
    types: dict[str, pa.DataType] | None = None,
    whole_file: bool = False,
    row_groups: tuple[int, int] | None = None,
    batch_rows: int | None = None,
) -> Iterator[pa.Table]:
    """Stream only `columns` of a pool file in file order, one parquet row group or jsonl block
    at a time (memory: one of those, however large the file), after checking that `columns`
    and `expect` (needed later) all exist. Remote parquet is read with ranged column-chunk
    reads; `local` is the fetched copy of a remote file. `whole_file` reads parquet in one go,
    for small columns (ids, scores) of remote files: one coalesced set of ranged reads rather
    than one request per row group. `row_groups` = (lo, hi) reads only parquet row groups [lo, hi).
    `batch_rows`: a local parquet file comes in tables of at most
    that many rows, each within one row group (the reader's buffers are then reused; whole row
    groups of text are fresh allocations, and their page faults cost as much as decoding).

    Single-threaded decoding: parallelism comes from worker processes, and Arrow's thread pool
    would only add contention (measured: 10x the system time for the same read)."""
    try:
        if pf.fmt == "parquet" and pf.remote and local is None:
            rf = RemoteParquet(pf)
            parquet_columns_check(pf, rf.file.schema_arrow, [*columns, *expect])
            if whole_file:
                yield rf.read(columns)
            else:
                yield from rf.row_groups(columns, groups=row_groups)
        elif pf.fmt == "parquet":
            with open_source(pf, local) as src:
                f = pq.ParquetFile(src)
                parquet_columns_check(pf, f.schema_arrow, [*columns, *expect])
                if whole_file:
                    yield f.read(columns=columns, use_threads=False)
                    return
                for i in range(*(row_groups or (0, f.num_row_groups))):
                    if batch_rows is None:
                        yield f.read_row_group(i, columns=columns, use_threads=False)
                        continue
                    for b in f.iter_batches(batch_rows, row_groups=[i], columns=columns, use_threads=False):
                        yield pa.Table.from_batches([b])
        else:
            yield from _jsonl_tables(pf, local, columns, list(expect), types or {})
    except ArmlabError:
        raise  # the store's own one line (the network, a file changed since it was listed)
    except FileNotFoundError:
        raise (deleted(pf) if local is None else BadFile(pf.name, "its downloaded copy is gone")) from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadFile(pf.name, describe_error(e)) from None


class BadFile(ArmlabError):
    """A pool file that cannot be read (corrupt, truncated, not the declared format)."""

    def __init__(self, file: str, reason: str):
        super().__init__(file, reason)  # both in args, so the error pickles back from a worker
        self.file, self.reason = file, reason

    def __str__(self) -> str:
        return (
            f"{self.file}: unreadable ({self.reason}); "
            "re-download or remove it, or rerun with --skip-bad-files to skip and record it"
        )


def describe_error(err: Exception) -> str:
    lines = str(err).splitlines() or [""]
    return f"{type(err).__name__}: {lines[0][:200]}"


@dataclass(frozen=True)
class FileStats:
    rows: int
    text_bytes: int  # uncompressed size of the text column (an estimate of its characters)


def file_stats(pf: PoolFile, text_column: str, local: Path | None = None) -> FileStats:
    """Rows and text size from parquet metadata only (no data read); jsonl: rows unknown (-1)."""
    if pf.fmt != "parquet":
        return FileStats(rows=-1, text_bytes=pf.size)
    return stats_from_metadata(parquet_metadata(pf, local), text_column)


def parquet_metadata(pf: PoolFile, local: Path | None = None) -> pq.FileMetaData:
    """The footer of a pool parquet file (remote: one ranged read of its tail; `local`: the
    downloaded copy)."""
    return _parquet_file(pf, local).metadata


def parquet_schema(pf: PoolFile, local: Path | None = None) -> pa.Schema:
    """The Arrow schema a read of the file gives (from its footer, like `parquet_metadata`)."""
    return _parquet_file(pf, local).schema_arrow


def _parquet_file(pf: PoolFile, local: Path | None) -> pq.ParquetFile:
    try:
        if pf.remote and local is None:
            return RemoteParquet(pf).file
        return pq.ParquetFile(str(local or pf.path))
    except RangesIgnored:
        raise ArmlabError(
            f"{pf.name}: the server ignores HTTP Range requests, so this file's footer (its row counts "
            "and column sizes) can only be read by downloading all of it; `armlab prepare` works "
            "(it downloads whole files), estimates from the footers do not"
        ) from None
    except ArmlabError:
        raise
    except FileNotFoundError:
        raise deleted(pf) from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadFile(pf.name, describe_error(e)) from None


def stats_from_metadata(md: pq.FileMetaData, text_column: str) -> FileStats:
    idx = [i for i in range(md.num_columns) if md.schema.column(i).path == text_column]
    text_bytes = 0
    for rg in range(md.num_row_groups):
        for i in idx:
            text_bytes += md.row_group(rg).column(i).total_uncompressed_size
    # Subtract the 4-byte length prefix PLAIN encoding stores per value.
    return FileStats(rows=md.num_rows, text_bytes=max(0, text_bytes - 4 * md.num_rows))
