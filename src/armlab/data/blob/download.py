"""Verified, resumable downloads of a prefix's blobs into a local dir (`download_prefix`), and
`fetch_prebuilt`, the entry point `armlab.data.prepare` uses for az:// prebuilt arms.

Downloads (`fetch_prebuilt`, `pull`, `pull_shared`) keep a small record beside the files
(`.armlab-blobs.json`): what the prefix held when listed (name, size, ETag, Content-MD5), which
files are downloaded and verified (with their local md5 and sha256), and how far each partial
download got. From it:

- a rerun skips blobs whose ETag and size are unchanged and whose file is on disk;
- a partial download (`.<name>.part`, killed process or dropped connection) continues with ranged
  reads from the last byte that was fsynced and recorded; the ranged reads carry the ETag as an
  If-Match condition, so a blob replaced on the server restarts from zero instead of being spliced;
- `skip_download=True` uses what is on disk after re-hashing it against the record, offline.

Integrity: size and ETag always; Content-MD5 when the blob has one (blobs uploaded in blocks often
have none; then size+ETag is what we have, and the record says so). A mismatch is downloaded once
more, then reported; a file becomes visible under its real name only once verified, and its parquet
footer must show a string `text` column. Nothing corrupt or half-written is ever left under a real
name. Transient failures are retried by azure-core per request and by us per blob
(`RetrySettings`), then reported as one line; rerunning resumes.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from armlab.data.blob.address import AzPath, _preview, parse_az_uri
from armlab.data.blob.auth import BlobAuth, RetrySettings, auth_from_env, service_client
from armlab.data.blob.sdk import (
    RemoteBlob,
    _Aborted,
    _az_error,
    _BadBlob,
    _Changed,
    _first_line,
    _list,
    _remote,
    _retrying,
)
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.text import plural
from armlab.workdir import atomic_write_json, cleanup_temp_files, read_json

RECORD_NAME = ".armlab-blobs.json"
SEGMENT_BYTES = 64 << 20  # unit of resumption: fsynced and recorded before the next one starts
HASH_CHUNK = 8 << 20


def _hash_file(path: Path) -> tuple[str, str]:
    """(md5, sha256) hex of a file in one pass (hashlib releases the GIL: threads hash in parallel)."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _parquet_problem(path: Path) -> str | None:
    """Why `path` is not a usable shard (footer only), or None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        return f"not a parquet file: {_first_line(e)}"
    if "text" not in schema.names:
        return f"no 'text' column (columns: {', '.join(schema.names[:8])})"
    t = schema.field("text").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return f"column 'text' is {t}, not string"
    return None


@dataclass
class FetchReport:
    uri: str
    dest: Path
    blobs: int = 0
    fetched: int = 0
    skipped: int = 0  # already downloaded and verified
    bytes_fetched: int = 0
    bytes_resumed: int = 0  # bytes of partial downloads that were continued, not fetched again
    no_md5: list[str] = field(default_factory=list)  # verified by size+ETag only
    ignored: list[str] = field(default_factory=list)  # non-parquet blobs under the prefix
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_fetched / self.seconds / 1e6 if self.seconds else 0.0


class _Record:
    """The download record (`.armlab-blobs.json`): shared by worker threads, saved atomically."""

    def __init__(self, dest: Path, uri: str):
        self.path = dest / RECORD_NAME
        self.lock = threading.Lock()
        data = read_json(self.path) if self.path.exists() else {}
        self.uri = uri
        self.listing: dict[str, dict[str, Any]] = data.get("listing", {})
        self.files: dict[str, dict[str, Any]] = data.get("files", {})
        self.partial: dict[str, dict[str, Any]] = data.get("partial", {})
        self.ignored: list[str] = data.get("ignored", [])
        self.previous_uri: str | None = data.get("uri")

    def save(self) -> None:
        with self.lock:
            atomic_write_json(
                self.path,
                {
                    "uri": self.uri,
                    "listing": self.listing,
                    "ignored": self.ignored,
                    "files": self.files,
                    "partial": self.partial,
                },
            )


def _local_parquet(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*.parquet") if not p.name.startswith(".")}


def _part_path(dest: Path, rel: str) -> Path:
    final = dest / rel
    return final.parent / f".{final.name}.part"


class _Fetcher:
    """Downloads blobs of one prefix into `dest`, one `fetch(blob)` per worker thread."""

    def __init__(
        self,
        cc: Any,  # azure ContainerClient
        az: AzPath,
        dest: Path,
        record: _Record,
        auth: BlobAuth,
        retry: RetrySettings,
        range_concurrency: int,
        report: FetchReport,
        on_bytes: Callable[[int], None],
    ):
        self.cc, self.az, self.dest, self.record = cc, az, dest, record
        self.auth, self.retry, self.range_concurrency = auth, retry, range_concurrency
        self.report, self.on_bytes = report, on_bytes
        self.abort = threading.Event()
        self.stats_lock = threading.Lock()

    def fetch(self, blob: RemoteBlob) -> None:
        try:
            self._fetch(blob)
        except (_BadBlob, _Aborted):
            raise
        except BaseException:
            self.abort.set()  # stop the other workers now, not when the main thread gets to it
            raise

    def _fetch(self, blob: RemoteBlob) -> None:
        if self.abort.is_set():
            raise _Aborted
        final = self.dest / blob.rel
        part = _part_path(self.dest, blob.rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        for try_no in (1, 2):
            blob = _retrying(
                lambda b=blob: self._download(b, part),
                self.az.uri(blob.rel),
                self.retry,
                self.abort,
                self.auth,
            )
            md5, sha256 = _hash_file(part)
            size = part.stat().st_size
            if size != blob.size:
                problem = f"downloaded {size:,} bytes, the blob has {blob.size:,}"
            elif blob.content_md5 and md5 != blob.content_md5:
                problem = "content does not match the blob's Content-MD5"
            else:
                break
            self._drop(blob, part)
            if try_no == 2:
                raise ArmlabError(
                    f"{self.az.uri(blob.rel)}: {problem} after 2 downloads (corrupted on the server?); "
                    "nothing was kept: re-upload the blob or remove it from the prefix"
                )
            console.print(f"[yellow]{self.az.uri(blob.rel)}: {problem}; downloading it again")
        if blob.rel.endswith(".parquet") and (bad := _parquet_problem(part)):
            self._drop(blob, part)
            raise _BadBlob(f"{blob.rel} ({bad})")
        os.replace(part, final)
        with self.record.lock:
            self.record.files[blob.rel] = {
                **blob.as_json(),
                "md5": md5,
                "sha256": sha256,
                "verified": "size+etag+content-md5"
                if blob.content_md5
                else "size+etag (blob has no Content-MD5)",
            }
            self.record.partial.pop(blob.rel, None)
        self.record.save()
        with self.stats_lock:
            self.report.fetched += 1
            if not blob.content_md5:
                self.report.no_md5.append(blob.rel)

    def _drop(self, blob: RemoteBlob, part: Path) -> None:
        part.unlink(missing_ok=True)
        with self.record.lock:
            self.record.partial.pop(blob.rel, None)
        self.record.save()

    def _download(self, blob: RemoteBlob, part: Path) -> RemoteBlob:
        """Bring `part` to the blob's full size, continuing a recorded partial; returns the blob
        (refreshed if it changed on the server, which restarts the download)."""
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError

        with self.record.lock:
            state = self.record.partial.get(blob.rel)
        done = 0
        if state and state["etag"] == blob.etag and state["size"] == blob.size and part.exists():
            done = min(int(state["done"]), part.stat().st_size)
        if done:
            with self.stats_lock:
                self.report.bytes_resumed += done
        with self.record.lock:
            self.record.partial[blob.rel] = {"etag": blob.etag, "size": blob.size, "done": done}
        bc = self.cc.get_blob_client(blob.name)
        fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
        with os.fdopen(fd, "r+b") as f:
            f.truncate(done)  # bytes past the recorded point may be holes from parallel range writes
            while done < blob.size:
                if self.abort.is_set():
                    raise _Aborted
                n = min(SEGMENT_BYTES, blob.size - done)
                seen = 0

                def hook(current: int, _total: int | None) -> None:
                    nonlocal seen
                    self.on_bytes(current - seen)
                    seen = current

                try:
                    stream = bc.download_blob(
                        offset=done,
                        length=n,
                        etag=f'"{blob.etag}"',
                        match_condition=MatchConditions.IfNotModified,
                        max_concurrency=self.range_concurrency,
                        progress_hook=hook,
                    )
                    f.seek(done)
                    stream.readinto(f)
                except ResourceModifiedError:
                    # Replaced on the server: take its new identity (in place, so the retry sees
                    # it) and start again from zero; never splice two versions.
                    new = _remote(self.az, bc.get_blob_properties())
                    blob.size, blob.etag, blob.content_md5 = new.size, new.etag, new.content_md5
                    with self.record.lock:
                        self.record.partial.pop(blob.rel, None)
                    raise _Changed(
                        f"{blob.rel} changed on the server while downloading; starting it again"
                    ) from None
                f.flush()
                os.fsync(f.fileno())
                done += n
                with self.stats_lock:
                    self.report.bytes_fetched += n
                with self.record.lock:
                    self.record.partial[blob.rel]["done"] = done
                self.record.save()
        return blob


def download_prefix(
    uri: str,
    dest: str | Path,
    *,
    mode: str = "bulk",
    concurrency: int = 8,
    skip_download: bool = False,
    only: list[str] | None = None,
    retry: RetrySettings | None = None,
) -> FetchReport:
    """Download the parquet blobs under `uri` into `dest` (verified, resumable); see module doc.

    `only`: names (relative to the prefix) to fetch instead of every parquet blob, of any type; all
    must exist. The caller then owns the rest of `dest` (no check for other parquet files there).
    """
    az = parse_az_uri(uri)
    dest = Path(dest)
    if mode not in ("bulk", "sequential"):
        raise ArmlabError(f"download mode {mode!r}: expected 'bulk' or 'sequential'")
    if concurrency < 1:
        raise ArmlabError(f"concurrency {concurrency}: must be >= 1")
    if skip_download:
        return _verify_on_disk(az, dest, concurrency)
    retry = retry or RetrySettings()
    t0 = time.time()
    auth = auth_from_env()
    client = service_client(auth, threads=concurrency, retry=retry)
    cc = client.get_container_client(az.container)
    blobs, ignored = _list(cc, az, auth, retry, set(only) if only is not None else None)
    if only is not None:
        by_rel = {b.rel: b for b in blobs}
        missing = [n for n in only if n not in by_rel]
        if missing:
            raise ArmlabError(
                f"{az.uri()}: {plural(len(missing), 'expected blob')} missing ({_preview(missing)})"
            )
        blobs, ignored = [by_rel[n] for n in only], []
    if not blobs:
        found = f" (it holds only: {_preview(ignored)})" if ignored else ""
        raise ArmlabError(
            f"{az.uri()}: no .parquet blobs under this prefix{found}; check the container and prefix"
        )
    if ignored:
        console.print(f"{az.uri()}: skipping {plural(len(ignored), 'non-parquet blob')}: {_preview(ignored)}")

    dest.mkdir(parents=True, exist_ok=True)
    cleanup_temp_files(dest)  # a record write cut short by a kill (partial blobs are `.part`, kept)
    record = _Record(dest, az.uri())
    listed = {b.rel for b in blobs}
    # Files we downloaded earlier that the prefix no longer holds would be read as shards: remove.
    stale = [rel for rel in record.files if rel not in listed]
    for rel in stale:
        (dest / rel).unlink(missing_ok=True)
        record.files.pop(rel)
    if stale:
        console.print(f"{dest}: removed {plural(len(stale), 'file')} no longer under {az.uri()}: {_preview(stale)}")
    stray = sorted(_local_parquet(dest) - listed) if only is None else []
    if stray:
        raise ArmlabError(
            f"{dest}: holds parquet files that are not blobs of {az.uri()} ({_preview(stray)}); "
            "remove them (this dir must hold only the download)"
        )
    record.listing = {b.rel: b.as_json() for b in blobs}
    record.ignored = ignored
    record.partial = {k: v for k, v in record.partial.items() if k in listed}
    record.save()

    def current(b: RemoteBlob) -> bool:
        f = record.files.get(b.rel)
        p = dest / b.rel
        return (
            bool(f)
            and f["etag"] == b.etag
            and f["size"] == b.size
            and p.is_file()
            and p.stat().st_size == b.size
        )

    todo = [b for b in blobs if not current(b)]
    report = FetchReport(
        uri=az.uri(), dest=dest, blobs=len(blobs), skipped=len(blobs) - len(todo), ignored=ignored
    )
    report.no_md5 = [b.rel for b in blobs if not b.content_md5 and current(b)]
    if todo:
        _run_downloads(cc, az, dest, record, auth, retry, todo, mode, concurrency, report)
    report.seconds = time.time() - t0
    total = sum(b.size for b in blobs)
    console.print(
        f"{az.uri()}: {plural(len(blobs), 'blob')}, {total / 1e6:,.1f} MB in {dest}: {report.fetched} downloaded "
        f"({report.bytes_fetched / 1e6:,.1f} MB at {report.mb_per_s:,.1f} MB/s), {report.skipped} already verified"
        + (f"; {len(report.no_md5)} had no Content-MD5 (verified by size+ETag)" if report.no_md5 else "")
    )
    return report


def _run_downloads(
    cc: Any,
    az: AzPath,
    dest: Path,
    record: _Record,
    auth: BlobAuth,
    retry: RetrySettings,
    todo: list[RemoteBlob],
    mode: str,
    concurrency: int,
    report: FetchReport,
) -> None:
    # bulk: blobs in parallel; with fewer blobs than `concurrency`, the spare concurrency goes to
    # parallel ranges within each blob. sequential: one request at a time.
    threads = min(concurrency, len(todo)) if mode == "bulk" else 1
    range_concurrency = max(1, concurrency // threads) if mode == "bulk" else 1
    with progress() as prog:
        task = prog.add_task(
            f"download {az.uri()}", total=report.blobs, completed=report.skipped, unit="files", bytes=0
        )
        lock = threading.Lock()
        moved = 0

        def on_bytes(n: int) -> None:
            nonlocal moved
            with lock:
                moved += n
                prog.update(task, bytes=moved)

        fetcher = _Fetcher(cc, az, dest, record, auth, retry, range_concurrency, report, on_bytes)
        bad: list[str] = []
        errors: list[BaseException] = []
        ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="armlab-blob")
        try:
            futures = [ex.submit(fetcher.fetch, b) for b in todo]
            for fut in as_completed(futures):
                try:
                    fut.result()
                    prog.advance(task)
                except _BadBlob as e:
                    bad.append(str(e))
                    prog.advance(task)
                except _Aborted:
                    pass
                except Exception as e:
                    errors.append(e)
                    fetcher.abort.set()
        except BaseException:
            fetcher.abort.set()
            raise
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
            record.save()
    if errors:
        e = errors[0]
        raise e if isinstance(e, ArmlabError) else _az_error(e, az.uri(), auth)
    if bad:
        raise ArmlabError(
            f"{az.uri()}: {plural(len(bad), 'blob')} not usable as shards: {_preview(bad, 2)}; every .parquet blob needs a "
            "string 'text' column: remove them from the prefix (nothing of them was kept)"
        )


def _verify_on_disk(az: AzPath, dest: Path, concurrency: int) -> FetchReport:
    """--skip-download: check that every listed blob is on disk and hashes as recorded."""
    t0 = time.time()
    path = dest / RECORD_NAME
    if not path.exists():
        raise ArmlabError(
            f"{dest}: --skip-download, but nothing was downloaded here yet ({RECORD_NAME} missing); run without --skip-download"
        )
    record = _Record(dest, az.uri())
    if record.previous_uri != az.uri():
        raise ArmlabError(
            f"{dest}: --skip-download, but this dir holds a download of {record.previous_uri}, not {az.uri()}; "
            "run without --skip-download"
        )
    missing = [rel for rel in record.listing if rel not in record.files or not (dest / rel).is_file()]
    if missing:
        raise ArmlabError(
            f"--skip-download: {len(missing)} of {plural(len(record.listing), 'blob')} of {az.uri()} not on disk in {dest} "
            f"({_preview(missing)}); rerun without --skip-download to fetch them"
        )
    stray = sorted(_local_parquet(dest) - set(record.listing))
    if stray:
        raise ArmlabError(
            f"{dest}: holds parquet files that are not blobs of {az.uri()} ({_preview(stray)}); remove them"
        )

    def check(rel: str) -> str | None:
        want = record.files[rel]
        p = dest / rel
        if p.stat().st_size != want["size"] or _hash_file(p)[0] != want["md5"]:
            p.unlink()  # never keep a corrupt file
            return rel
        return None

    names = sorted(record.listing)
    corrupt: list[str] = []
    with progress() as prog, ThreadPoolExecutor(max_workers=concurrency) as ex:
        task = prog.add_task(f"verify {dest.name}", total=len(names), unit="files", bytes=0)
        nbytes = 0
        for rel, bad in zip(names, ex.map(check, names), strict=True):
            nbytes += record.files[rel]["size"]
            prog.update(task, advance=1, bytes=nbytes)
            if bad:
                corrupt.append(bad)
    if corrupt:
        for rel in corrupt:
            record.files.pop(rel)
        record.save()
        raise ArmlabError(
            f"--skip-download: {plural(len(corrupt), 'file')} in {dest} changed since download ({_preview(corrupt)}); "
            "deleted them: rerun without --skip-download to fetch them again"
        )
    report = FetchReport(
        uri=az.uri(), dest=dest, blobs=len(names), skipped=len(names), ignored=record.ignored
    )
    report.no_md5 = [rel for rel in names if not record.files[rel].get("content_md5")]
    report.seconds = time.time() - t0
    console.print(
        f"{az.uri()}: --skip-download: {plural(len(names), 'file')} in {dest} verified against the download record"
    )
    return report


def fetch_prebuilt(
    uri: str, dest: Path, *, mode: str = "bulk", concurrency: int = 8, skip_download: bool = False
) -> Path:
    """Download `az://container/prefix`'s parquet blobs into `dest` (verified, resumable); returns `dest`.

    Contract for `armlab.data.prepare`, which then normalises the files (eval removal, shuffle,
    re-sharding). Raises ArmlabError (one line) for every bad input or failure.
    """
    return download_prefix(uri, dest, mode=mode, concurrency=concurrency, skip_download=skip_download).dest


def read_download_record(dest: str | Path) -> dict[str, Any]:
    """The download record of `dest` (what `fetch_prebuilt` verified), e.g. for provenance."""
    return read_json(Path(dest) / RECORD_NAME)
