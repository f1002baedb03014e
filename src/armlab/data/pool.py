"""Open a pool by URI: list its files, read only the columns needed, fetch remote files.

A pool URI is a local file, dir or glob (`/data/pool/*.parquet`), or an fsspec URL:
`hf://datasets/<repo>/<glob>` for the Hugging Face hub (HF_TOKEN is read from the environment
by huggingface_hub itself and never logged), or any other fsspec protocol (`file://...` is
what the tests use to exercise the remote path without a network).

Remote files take two routes. Passes that need one or two small columns (ids, scores) read
them in place with ranged reads (parquet column chunks), so the text is never downloaded for
them. The text pass fetches whole files into a bounded cache under `<workdir>/cache/pool/`,
prefetching a few files ahead, retrying each download, and deleting each file once it has been
used (unless keep_cache): a 1.6 TB pool never needs 1.6 TB of disk, and a dropped connection
costs one file, not the run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from armlab.errors import ArmlabError
from armlab.spec import PoolSpec

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
    identity: str = ""  # the file's content identity (`local_identity` / `remote_identity`)

    @property
    def remote(self) -> bool:
        return self.protocol is not None

    @property
    def name(self) -> str:
        return self.path if not self.remote else f"{self.protocol}://{self.path}"

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


def filesystem(protocol: str) -> Any:
    import fsspec

    if protocol == "hf":
        from huggingface_hub import HfFileSystem

        return HfFileSystem()  # picks up HF_TOKEN from the environment; never passed through our logs
    return fsspec.filesystem(protocol)


def list_pool(spec: PoolSpec) -> list[PoolFile]:
    """The pool's files in a stable (sorted) order; ArmlabError naming the URI when there are none."""
    protocol, path = split_uri(spec.uri)
    files: list[PoolFile] = []
    if protocol is None:
        p = Path(path)
        if p.is_file():
            candidates = [str(p)]
        elif p.is_dir():
            candidates = sorted(str(q) for q in p.rglob("*") if q.is_file())
        else:
            candidates = sorted(glob.glob(path, recursive=True))
        for c in candidates:
            fmt = file_format(c, spec.format)
            if fmt and Path(c).is_file():
                files.append(PoolFile(c, os.path.getsize(c), fmt, identity=local_identity(c, fmt)))
    else:
        try:
            fs = filesystem(protocol)
            if glob.has_magic(path):
                found = fs.glob(path, detail=True)
            elif fs.isdir(path):
                found = fs.find(path, detail=True)
            else:
                found = {path: fs.info(path)}
        except (OSError, ValueError) as e:
            raise ArmlabError(f"pool.uri {spec.uri!r}: cannot list files ({type(e).__name__}: {e})") from None
        for name, info in sorted(found.items()):
            fmt = file_format(name, spec.format)
            if fmt and info.get("type", "file") == "file":
                files.append(PoolFile(name, int(info.get("size") or 0), fmt, protocol, remote_identity(info)))
    if not files:
        raise ArmlabError(
            f"pool.uri {spec.uri!r}: no parquet or jsonl(.gz/.zst) files found; check the path or glob"
        )
    return files


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


def remote_identity(info: dict[str, Any]) -> str:
    """What the store lists about a file's contents, strongest first: a content hash (the hub's
    LFS sha256 or xet hash, a Content-MD5), then a version tag (ETag, the hub's git blob id), then
    the modification time. '' when the store lists none of these (the fingerprint then has only
    the name and size to go on)."""
    lfs = info.get("lfs")
    if isinstance(lfs, dict) and (lfs.get("sha256") or lfs.get("oid")):
        return f"sha256:{lfs.get('sha256') or lfs.get('oid')}"
    lower = {str(k).lower(): v for k, v in info.items() if v not in (None, "")}
    for key, tag in (
        ("xet_hash", "xet"),
        ("content-md5", "md5"),
        ("md5", "md5"),
        ("etag", "etag"),
        ("blob_id", "git"),
        ("last-modified", "mtime"),
        ("last_modified", "mtime"),
        ("lastmodified", "mtime"),
        ("mtime", "mtime"),
    ):
        if key in lower:
            value = lower[key]
            text = value.isoformat() if hasattr(value, "isoformat") else str(value).replace('"', "")
            return f"{tag}:{text}"
    return ""


# -- reading ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_source(pf: PoolFile, local: Path | None = None) -> Iterator[Any]:
    """A readable source for pyarrow: the local path, or a seekable remote file (ranged reads)."""
    if local is not None or not pf.remote:
        yield str(local or pf.path)
    else:
        with filesystem(pf.protocol).open(pf.path, "rb") as f:
            yield f


def missing_columns(pf: PoolFile, names: list[str], wanted: list[str], fix: str) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ArmlabError(f"{pf.name}: no column {missing[0]!r} (columns: {', '.join(names)}); {fix}")


def parquet_columns_check(pf: PoolFile, schema: pa.Schema, columns: list[str]) -> None:
    missing_columns(pf, schema.names, columns, "fix the column name in [pool] or the arm")


def _jsonl_stream(src: Any, pf: PoolFile) -> pa.NativeFile:
    compression = "gzip" if pf.path.endswith(".gz") else "zstd" if pf.path.endswith(".zst") else None
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
    with open_source(pf, local) as src, _jsonl_stream(src, pf) as stream:
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
                    _jsonl_stream(src, pf),
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
) -> Iterator[pa.Table]:
    """Stream only `columns` of a pool file in file order, one parquet row group or jsonl block
    at a time (memory: one of those, however large the file), after checking that `columns`
    and `expect` (needed later) all exist. Remote parquet is read with ranged column-chunk
    reads; `local` is the fetched copy of a remote file. `whole_file` reads parquet in one go,
    for small columns (ids, scores) of remote files: one coalesced set of ranged reads rather
    than one request per row group.

    Single-threaded decoding: parallelism comes from worker processes, and Arrow's thread pool
    would only add contention (measured: 10x the system time for the same read)."""
    try:
        if pf.fmt == "parquet":
            with open_source(pf, local) as src:
                f = pq.ParquetFile(src)
                parquet_columns_check(pf, f.schema_arrow, [*columns, *expect])
                if whole_file:
                    yield f.read(columns=columns, use_threads=False)
                    return
                for i in range(f.num_row_groups):
                    yield f.read_row_group(i, columns=columns, use_threads=False)
        else:
            yield from _jsonl_tables(pf, local, columns, list(expect), types or {})
    except ArmlabError:
        raise
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


def file_stats(pf: PoolFile, text_column: str) -> FileStats:
    """Rows and text size from parquet metadata only (no data read); jsonl: rows unknown (-1)."""
    if pf.fmt != "parquet":
        return FileStats(rows=-1, text_bytes=pf.size)
    try:
        with open_source(pf) as src:
            md = pq.ParquetFile(src).metadata
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadFile(pf.name, describe_error(e)) from None
    idx = [i for i in range(md.num_columns) if md.schema.column(i).path == text_column]
    text_bytes = 0
    for rg in range(md.num_row_groups):
        for i in idx:
            text_bytes += md.row_group(rg).column(i).total_uncompressed_size
    # Subtract the 4-byte length prefix PLAIN encoding stores per value.
    return FileStats(rows=md.num_rows, text_bytes=max(0, text_bytes - 4 * md.num_rows))


# -- fetching --------------------------------------------------------------------------------------
def fetch_file(pf: PoolFile, cache_dir: Path, retries: int = 5, backoff: float = 2.0) -> Path:
    """Download a remote pool file into the cache (temp name, then rename), retrying with backoff.

    A file already in the cache with the expected size is reused (a resumed prepare).
    """
    dest = cache_dir / pf.protocol / pf.path.lstrip("/")
    if dest.is_file() and (pf.size <= 0 or dest.stat().st_size == pf.size):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    for attempt in range(retries + 1):
        try:
            filesystem(pf.protocol).get_file(pf.path, str(tmp))
            if pf.size > 0 and tmp.stat().st_size != pf.size:
                raise OSError(f"size {tmp.stat().st_size} != listed {pf.size}")
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # network errors come in many types; every one is retried
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            if attempt == retries:
                raise ArmlabError(
                    f"{pf.name}: download failed after {retries + 1} attempts ({type(e).__name__}: {str(e)[:200]}); "
                    "rerun to resume (finished files are kept)"
                ) from None
            time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


class Prefetcher:
    """Fetches remote files a few ahead of their use into a bounded cache.

    `get(i)` returns file i's local path (local files: their own path), waiting for its download;
    at most `ahead` downloads are in flight or waiting to be used. `release(i)` deletes a fetched
    file after use unless keep_cache.
    """

    def __init__(
        self,
        files: list[PoolFile],
        order: list[int],
        cache_dir: Path,
        ahead: int = 3,
        keep_cache: bool = False,
        retries: int = 5,
        backoff: float = 2.0,
    ):
        self.files, self.order, self.cache_dir = files, order, cache_dir
        self.ahead, self.keep_cache, self.retries, self.backoff = max(1, ahead), keep_cache, retries, backoff
        self.pool = ThreadPoolExecutor(max_workers=self.ahead)
        self.futures: dict[int, Future[Path]] = {}
        self.next = 0  # position in `order` of the next file to submit

    def _fill(self) -> None:
        while self.next < len(self.order) and len(self.futures) < self.ahead:
            i = self.order[self.next]
            self.next += 1
            pf = self.files[i]
            if pf.remote:
                self.futures[i] = self.pool.submit(fetch_file, pf, self.cache_dir, self.retries, self.backoff)

    def get(self, i: int) -> Path:
        pf = self.files[i]
        if not pf.remote:
            self._fill()
            return Path(pf.path)
        self._fill()
        if i not in self.futures:  # asked out of order: fetch it now
            self.futures[i] = self.pool.submit(fetch_file, pf, self.cache_dir, self.retries, self.backoff)
        return self.futures[i].result()

    def release(self, i: int) -> None:
        fut = self.futures.pop(i, None)
        if fut is not None and not self.keep_cache:
            with contextlib.suppress(Exception):
                fut.result().unlink()
        self._fill()

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.pool.shutdown(wait=True)
        if not self.keep_cache:
            for i, fut in list(self.futures.items()):
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    with contextlib.suppress(FileNotFoundError):
                        fut.result().unlink()
                self.futures.pop(i)
