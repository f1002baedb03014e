"""Azure Blob Storage: download prebuilt shards; publish and pull an arm, and the experiment's
shared eval set + tokenizer.

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

Publishing uploads a dir's files with Content-MD5 set and its manifest.json last, so a reader never
sees a manifest whose files are not all there; blobs already present with the same size and MD5 are
skipped, which makes an interrupted publish resumable. Pulling reads the published manifest first,
downloads the files it names (as above: verified, resumable), checks them against it, and writes
the manifest locally last. Two kinds of dirs travel this way:

- an arm (`publish`, `pull`): `<workdir>/arms/<arm>/data/` <-> `az://c/<arm prefix>/`, shards
  checked against the manifest's sha256; pull refuses an arm of another spec or eval set;
- the experiment's shared assets (`publish_shared`, `pull_shared`), which a GPU node needs besides
  its arm to train and to stay comparable: the eval set and the tokenizer (not its training
  sample), under an experiment prefix:

      az://c/<exp prefix>/_shared/eval/       shard_*.parquet + manifest.json  (<workdir>/eval/)
      az://c/<exp prefix>/_shared/tokenizer/  tokenizer.pkl, token_bytes.npy, manifest.json
      az://c/<exp prefix>/<arm>/              an arm published beside them (`arm_uri`)

  Pull refuses assets of another spec, and a different eval set or tokenizer already in the
  workdir unless forced; it changes nothing while a run of the experiment holds a lease.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from armlab.data.azure_auth import BlobAuth, RetrySettings, auth_from_env, scrub, service_client
from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.workdir import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable,
    open_workdir,
    read_json,
    read_lease,
)

RECORD_NAME = ".armlab-blobs.json"
MANIFEST_NAME = "manifest.json"
SEGMENT_BYTES = 64 << 20  # unit of resumption: fsynced and recorded before the next one starts
HASH_CHUNK = 8 << 20
PARQUET_TYPE = "application/vnd.apache.parquet"
# Azure's container naming rule: 3-63 chars, lowercase letters, digits and single hyphens.
CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")

T = TypeVar("T")


# -- addresses --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AzPath:
    """`az://container/prefix`; the prefix is a folder ("" or ending in "/")."""

    container: str
    prefix: str

    def uri(self, name: str = "") -> str:
        return f"az://{self.container}/{self.prefix}{name}"


def parse_az_uri(uri: str) -> AzPath:
    """Split `az://container/prefix`. The prefix names a folder: `az://c/top16` is `top16/`."""
    if not uri.startswith("az://"):
        raise ArmlabError(f"{uri!r}: not an Azure blob uri; expected az://<container>/<prefix>")
    container, _, prefix = uri.removeprefix("az://").partition("/")
    if not CONTAINER_RE.match(container):
        raise ArmlabError(
            f"{uri}: {container!r} is not a valid container name (3-63 lowercase letters, digits and hyphens)"
        )
    prefix = prefix.strip("/")
    return AzPath(container, prefix + "/" if prefix else "")


def _rel_name(az: AzPath, name: str) -> str:
    """A blob's path under the local dir; refuses names that would escape it."""
    rel = name[len(az.prefix) :]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArmlabError(
            f"{az.uri(rel)}: blob name cannot be mapped to a local file safely; rename the blob"
        )
    return rel


def _preview(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


# -- Azure errors -----------------------------------------------------------------------------------
class _BadBlob(Exception):
    """A blob that downloaded fine but is not a usable shard (not parquet, no text column)."""


class _Aborted(Exception):
    """Another worker hit a fatal error; stop without starting more work."""


class _Changed(Exception):
    """The blob was replaced on the server since it was listed (If-Match failed)."""


def _endpoint(auth: BlobAuth) -> str:
    return auth.account_url.split("?")[0]


def _first_line(e: BaseException) -> str:
    """A short, scrubbed reason: the OS error when there is one ("[Errno 111] Connection refused"
    rather than urllib3's nested repr), else the message's first line."""
    text = scrub(str(e)).strip()
    if m := re.search(r"\[Errno -?\d+\] [^'\")\]]+", text):
        return m.group(0)
    lines = text.splitlines()
    line = lines[0] if lines else type(e).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _az_error(e: Exception, where: str, auth: BlobAuth, attempts: int = 0) -> ArmlabError:
    """One scrubbed line for an Azure SDK error, saying what to check (`attempts`: given up after)."""
    from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError, ServiceResponseError

    code = getattr(e, "error_code", None)
    code = str(getattr(code, "value", code) or "")
    status = getattr(e, "status_code", None)
    if code == "ContainerNotFound":
        return ArmlabError(
            f"{where}: container not found at {_endpoint(auth)}; check its name (armlab never creates containers: "
            "`az storage container create --name <container>`)"
        )
    if isinstance(e, ClientAuthenticationError) or status in (401, 403):
        return ArmlabError(
            f"{where}: access denied by {_endpoint(auth)} ({code or status}) with credentials from {auth.source}; "
            "check the key or SAS token and its permissions (read+list to download, write+delete to publish)"
        )
    tried = f" after {attempts} attempts" if attempts else ""
    if isinstance(e, ServiceRequestError | ServiceResponseError):
        return ArmlabError(
            f"{where}: cannot reach {_endpoint(auth)}{tried} ({_first_line(e)}); "
            "check the network, then rerun the same command to resume"
        )
    if isinstance(e, _Changed):
        return ArmlabError(f"{where}: the blob kept changing on the server{tried}; rerun when it is stable")
    if attempts:
        return ArmlabError(f"{where}: {_first_line(e)} (gave up{tried}); rerun the same command to resume")
    return ArmlabError(f"{where}: {_first_line(e)}")


def _transient(e: BaseException) -> bool:
    """Worth retrying: the server or the network, not us (auth, not found, bad request)."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(e, ServiceRequestError | ServiceResponseError | _Changed | ConnectionError | TimeoutError):
        return True
    if isinstance(e, HttpResponseError):
        status = e.status_code
        return status is None or status >= 500 or status in (408, 429)
    # urllib3/requests errors that escape azure-core's wrapping mid-stream
    return type(e).__module__.split(".")[0] in ("urllib3", "requests", "http")


def _retrying(
    fn: Callable[[], T], what: str, retry: RetrySettings, abort: threading.Event, auth: BlobAuth
) -> T:
    """Run `fn`, retrying transient failures with exponential backoff; then one clear line."""
    attempt = 0
    while True:
        if abort.is_set():
            raise _Aborted
        try:
            return fn()
        except (ArmlabError, _BadBlob, _Aborted):
            raise
        except Exception as e:
            if not _transient(e):
                raise _az_error(e, what, auth) from None
            attempt += 1
            if attempt >= retry.attempts:
                raise _az_error(e, what, auth, attempts=attempt) from None
            wait = retry.backoff * 2 ** (attempt - 1)
            console.print(
                f"[yellow]{what}: {_first_line(e)}; retrying in {wait:.1f}s ({attempt}/{retry.attempts - 1})"
            )
            abort.wait(wait)


# -- hashing and parquet checks ---------------------------------------------------------------------
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


# -- listing ----------------------------------------------------------------------------------------
@dataclass
class RemoteBlob:
    name: str  # full blob name
    rel: str  # path under the local dir
    size: int
    etag: str  # without quotes
    content_md5: str | None  # hex, None when the blob has no Content-MD5

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "etag": self.etag, "content_md5": self.content_md5}


def _remote(az: AzPath, props: Any) -> RemoteBlob:
    md5 = props.content_settings.content_md5
    return RemoteBlob(
        name=props.name,
        rel=_rel_name(az, props.name),
        size=int(props.size),
        etag=str(props.etag).strip('"'),
        content_md5=bytes(md5).hex() if md5 else None,
    )


def _list(
    cc: Any, az: AzPath, auth: BlobAuth, retry: RetrySettings, only: set[str] | None = None
) -> tuple[list[RemoteBlob], list[str]]:
    """(wanted blobs, names of other blobs) under the prefix, sorted by name. Wanted: the parquet
    blobs, or with `only` the blobs of those names (relative to the prefix), of any type."""

    def run() -> tuple[list[RemoteBlob], list[str]]:
        blobs, others = [], []
        for props in cc.list_blobs(name_starts_with=az.prefix):
            rel = props.name[len(az.prefix) :]
            if rel in only if only is not None else props.name.endswith(".parquet"):
                blobs.append(_remote(az, props))
            elif not props.name.endswith("/"):  # folder placeholders of hierarchical accounts
                others.append(rel)
        return sorted(blobs, key=lambda b: b.name), sorted(others)

    return _retrying(run, az.uri(), retry, threading.Event(), auth)


# -- downloads --------------------------------------------------------------------------------------
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
                f"{az.uri()}: {len(missing)} expected blob(s) are missing ({_preview(missing)})"
            )
        blobs, ignored = [by_rel[n] for n in only], []
    if not blobs:
        found = f" (it holds only: {_preview(ignored)})" if ignored else ""
        raise ArmlabError(
            f"{az.uri()}: no .parquet blobs under this prefix{found}; check the container and prefix"
        )
    if ignored:
        console.print(f"{az.uri()}: skipping {len(ignored)} non-parquet blob(s): {_preview(ignored)}")

    dest.mkdir(parents=True, exist_ok=True)
    record = _Record(dest, az.uri())
    listed = {b.rel for b in blobs}
    # Files we downloaded earlier that the prefix no longer holds would be read as shards: remove.
    stale = [rel for rel in record.files if rel not in listed]
    for rel in stale:
        (dest / rel).unlink(missing_ok=True)
        record.files.pop(rel)
    if stale:
        console.print(f"{dest}: removed {len(stale)} file(s) no longer under {az.uri()}: {_preview(stale)}")
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
        f"{az.uri()}: {len(blobs)} blob(s), {total / 1e6:,.1f} MB in {dest}: {report.fetched} downloaded "
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
            f"{az.uri()}: {len(bad)} blob(s) are not usable shards: {_preview(bad, 2)}; every .parquet blob needs a "
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
            f"--skip-download: {len(missing)} of {len(record.listing)} blob(s) of {az.uri()} are not on disk in {dest} "
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
            f"--skip-download: {len(corrupt)} file(s) in {dest} changed since download ({_preview(corrupt)}); "
            "deleted them: rerun without --skip-download to fetch them again"
        )
    report = FetchReport(
        uri=az.uri(), dest=dest, blobs=len(names), skipped=len(names), ignored=record.ignored
    )
    report.no_md5 = [rel for rel in names if not record.files[rel].get("content_md5")]
    report.seconds = time.time() - t0
    console.print(
        f"{az.uri()}: --skip-download: {len(names)} file(s) in {dest} verified against the download record"
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


# -- publish / pull ---------------------------------------------------------------------------------
# A published dir (an arm's data dir, the eval set, the tokenizer) is its files plus manifest.json:
# publishing uploads the files with Content-MD5, then the manifest last; pulling reads the manifest
# first, downloads and verifies the files, then writes the manifest locally last. Either way a
# manifest is only ever visible beside a complete set of files.
SHARED_DIR = "_shared"  # under an experiment prefix; arm names start with a letter or digit, never "_"


def shared_uris(root_uri: str) -> dict[str, str]:
    """Where `publish --shared` puts an experiment's shared assets under `root_uri`."""
    root = parse_az_uri(root_uri)
    return {
        "eval": root.uri(f"{SHARED_DIR}/eval/"),
        "tokenizer": root.uri(f"{SHARED_DIR}/tokenizer/"),
    }


def arm_uri(root_uri: str, arm: str) -> str:
    """Where an arm goes when published together with the shared assets: `<root>/<arm>/`."""
    return parse_az_uri(root_uri).uri(f"{arm}/")


def _complete_manifest(directory: Path, fix: str) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise ArmlabError(f"{directory}: no {MANIFEST_NAME}; {fix}")
    manifest = read_json(path)
    if manifest.get("complete") is not True:
        raise ArmlabError(f"{path}: not complete (interrupted?); {fix}")
    return manifest


def _local_state(
    label: str, directory: Path, files: list[str], sha256: dict[str, str] | None, fix: str, concurrency: int
) -> dict[str, tuple[int, str]]:
    """(size, md5) of each file and of manifest.json, after checking that every file is there and,
    where `sha256` lists it, is the one the manifest names (never publish a modified file)."""
    missing = [n for n in files if not (directory / n).is_file()]
    if missing:
        raise ArmlabError(
            f"{directory}: {len(missing)} file(s) of {MANIFEST_NAME} are missing ({_preview(missing)}); {fix}"
        )
    local: dict[str, tuple[int, str]] = {}
    with progress() as prog, ThreadPoolExecutor(max_workers=concurrency) as ex:
        task = prog.add_task(f"verify {label}", total=len(files), unit="files", bytes=0)
        nbytes = 0
        for name, (md5, sha) in zip(files, ex.map(lambda n: _hash_file(directory / n), files), strict=True):
            if sha256 is not None and sha != sha256[name]:
                raise ArmlabError(
                    f"{directory / name}: sha256 differs from {MANIFEST_NAME} (modified after it was written?); {fix}"
                )
            size = (directory / name).stat().st_size
            local[name] = (size, md5)
            nbytes += size
            prog.update(task, advance=1, bytes=nbytes)
    manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
    local[MANIFEST_NAME] = (len(manifest_bytes), hashlib.md5(manifest_bytes).hexdigest())
    return local


@dataclass
class PublishReport:
    uri: str
    files: int
    uploaded: int
    skipped: int
    bytes_uploaded: int
    seconds: float


def _upload_dir(
    kind: str,
    label: str,
    directory: Path,
    files: list[str],
    local: dict[str, tuple[int, str]],
    az: AzPath,
    *,
    concurrency: int,
    replace: bool,
    retry: RetrySettings,
) -> PublishReport:
    """Upload `files` of `directory` to `az` (Content-MD5 set), then its manifest.json last.

    `kind` ("arm", "eval set", "tokenizer") and `label` name it in messages; `local` is
    `_local_state`'s (size, md5) per file. Blobs already there with the same size and
    MD5 are skipped (an interrupted publish resumes). Blobs under the prefix that are not this
    dir's are refused unless `replace`, which deletes them.
    """
    from azure.storage.blob import ContentSettings

    t0 = time.time()
    manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
    if (len(manifest_bytes), hashlib.md5(manifest_bytes).hexdigest()) != local[MANIFEST_NAME]:
        raise ArmlabError(f"{directory / MANIFEST_NAME}: changed while publishing; rerun")
    auth = auth_from_env()
    client = service_client(auth, threads=concurrency, retry=retry)
    cc = client.get_container_client(az.container)
    abort = threading.Event()

    def remote_state() -> dict[str, tuple[int, str | None]]:
        out = {}
        for p in cc.list_blobs(name_starts_with=az.prefix):
            md5 = p.content_settings.content_md5
            out[p.name[len(az.prefix) :]] = (int(p.size), bytes(md5).hex() if md5 else None)
        return out

    remote = _retrying(remote_state, az.uri(), retry, abort, auth)
    others = sorted(set(remote) - set(local))
    if others and not replace:
        raise ArmlabError(
            f"{az.uri()}: the prefix already holds {len(others)} blob(s) that are not this {kind}'s "
            f"({_preview(others)}); choose an empty prefix, or pass --replace to delete them"
        )
    todo = [n for n in files if remote.get(n) != local[n]]
    manifest_current = remote.get(MANIFEST_NAME) == local[MANIFEST_NAME]
    uploaded_bytes = 0
    if todo or others or not manifest_current:
        # The manifest goes first and comes back last: a reader never sees it with files changing.
        delete = ([MANIFEST_NAME] if MANIFEST_NAME in remote else []) + others
        for name in delete:
            _retrying(lambda n=name: cc.delete_blob(az.prefix + n), az.uri(name), retry, abort, auth)

        def upload(name: str, data: Any, size: int, hook: Callable[[int, int | None], None] | None) -> None:
            cc.upload_blob(
                az.prefix + name,
                data,
                length=size,
                overwrite=True,
                validate_content=True,  # per-request MD5 checked by the server (in transit)
                content_settings=ContentSettings(
                    content_type=_content_type(name),
                    content_md5=bytearray.fromhex(local[name][1]),  # stored: what readers verify against
                ),
                max_concurrency=max(1, concurrency // max(1, min(concurrency, len(todo)))),
                progress_hook=hook,
            )

        with progress() as prog, ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(todo)))) as ex:
            task = prog.add_task(
                f"publish {label}", total=len(files), completed=len(files) - len(todo), unit="files", bytes=0
            )
            lock = threading.Lock()

            def upload_file(name: str) -> int:
                seen = 0

                def hook(current: int, _total: int | None) -> None:
                    nonlocal seen, uploaded_bytes
                    with lock:
                        uploaded_bytes += current - seen
                        prog.update(task, bytes=uploaded_bytes)
                    seen = current

                def once() -> None:
                    with open(directory / name, "rb") as f:
                        upload(name, f, local[name][0], hook)

                _retrying(once, az.uri(name), retry, abort, auth)
                return local[name][0]

            try:
                for fut in as_completed([ex.submit(upload_file, n) for n in todo]):
                    fut.result()
                    prog.advance(task)
            except BaseException:
                abort.set()
                raise
        _retrying(
            lambda: upload(MANIFEST_NAME, manifest_bytes, len(manifest_bytes), None),
            az.uri(MANIFEST_NAME),
            retry,
            abort,
            auth,
        )
    report = PublishReport(
        az.uri(),
        len(files),
        len(todo),
        len(files) - len(todo),
        sum(local[n][0] for n in todo),
        time.time() - t0,
    )
    console.print(
        f"published {label} to {az.uri()}: {report.files} file(s), {report.uploaded} uploaded, "
        f"{report.skipped} already there" + (f", {len(others)} other blob(s) deleted" if others else "")
    )
    return report


def _content_type(name: str) -> str:
    if name.endswith(".parquet"):
        return PARQUET_TYPE
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def publish(
    exp: Any,
    arm: str,
    to_uri: str,
    *,
    concurrency: int = 8,
    replace: bool = False,
    retry: RetrySettings | None = None,
) -> PublishReport:
    """Upload arm `arm`'s shards and manifest.json to `to_uri` (manifest last, Content-MD5 set).

    Shards are checked against the manifest's sha256 first (never publish a modified shard).
    Blobs already there with the same size and MD5 are skipped (an interrupted publish resumes).
    Blobs under the prefix that are not this arm's are refused unless `replace`, which deletes them.
    """
    exp.arm(arm)
    az = parse_az_uri(to_uri)
    data_dir = open_workdir(exp, create=False).data_dir(arm)
    fix = f"run `armlab prepare` for arm {arm!r} before publishing it"
    manifest = _complete_manifest(data_dir, fix)
    files = [f["name"] for f in manifest["files"]]
    local = _local_state(
        arm, data_dir, files, {f["name"]: f["sha256"] for f in manifest["files"]}, fix, concurrency
    )
    return _upload_dir(
        "arm",
        arm,
        data_dir,
        files,
        local,
        az,
        concurrency=concurrency,
        replace=replace,
        retry=retry or RetrySettings(),
    )


def _tokenizer_files() -> list[str]:
    from armlab.tokenizer import ENCODING_FILE, NANOCHAT_TOKEN_BYTES_FILE, TOKEN_BYTES_FILE

    return [ENCODING_FILE, NANOCHAT_TOKEN_BYTES_FILE, TOKEN_BYTES_FILE]


def _check_tokenizer_spec(exp: Any, manifest: dict[str, Any], where: str) -> None:
    """The tokenizer must be this experiment's (the same check `load_experiment_tokenizer` makes)."""
    from armlab.tokenizer import spec_diff

    saved = manifest.get("spec") or {}
    changed = spec_diff(saved, exp)
    if changed:
        raise ArmlabError(
            f"{where}: tokenizer of experiment {saved.get('experiment')!r}, differs from this spec in: "
            f"{', '.join(changed)}; use the tokenizer published for this experiment"
        )


def _check_tokenizer_files(directory: Path, manifest: dict[str, Any]) -> None:
    """tokenizer.pkl must have the manifest's fingerprint, token_bytes.npy must be its token_bytes
    (the tokenizer manifest lists no file hashes: this is its content check)."""
    import pickle

    import numpy as np

    from armlab.tokenizer import ENCODING_FILE, TOKEN_BYTES_FILE, Tokenizer

    try:
        with open(directory / ENCODING_FILE, "rb") as f:
            tok = Tokenizer(pickle.load(f))
        token_bytes = np.load(directory / TOKEN_BYTES_FILE)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise ArmlabError(f"{directory}: unreadable tokenizer files ({_first_line(e)})") from None
    if tok.fingerprint != manifest.get("fingerprint"):
        raise ArmlabError(
            f"{directory / ENCODING_FILE}: fingerprint {tok.fingerprint}, but {MANIFEST_NAME} says "
            f"{manifest.get('fingerprint')}"
        )
    if not np.array_equal(token_bytes, tok.token_bytes):
        raise ArmlabError(f"{directory / TOKEN_BYTES_FILE}: does not match {ENCODING_FILE}")


def _eval_selection(exp: Any) -> dict[str, Any]:
    """The `selection` an eval manifest records for this experiment (prepare's, not a copy)."""
    from armlab.data.prepare import EVAL, plan_targets

    wd = open_workdir(exp, create=False)
    return next(t.selection for t in plan_targets(exp, wd, [], "") if t.name == EVAL)


def _check_eval_spec(exp: Any, manifest: dict[str, Any], where: str) -> None:
    from armlab.spec import fingerprint_diff

    ours = {"selection": _eval_selection(exp), "shards": exp.shards.model_dump()}
    diff = fingerprint_diff(ours, {k: manifest.get(k) for k in ours})
    if diff:
        raise ArmlabError(
            f"{where}: eval set of a different spec ({', '.join(diff[:4])} differ); "
            "use the eval set published for this experiment"
        )


def publish_shared(
    exp: Any,
    to_uri: str,
    *,
    concurrency: int = 8,
    replace: bool = False,
    retry: RetrySettings | None = None,
) -> list[PublishReport]:
    """Upload the experiment's eval set and tokenizer under `<to_uri>/_shared/` (see `shared_uris`).

    Both are checked before anything is uploaded: complete manifests, eval shards matching their
    sha256, a tokenizer of this experiment whose files match its fingerprint. Then each dir is
    uploaded like an arm (Content-MD5 set, manifest last, resumable).
    """
    uris = shared_uris(to_uri)
    retry = retry or RetrySettings()
    wd = open_workdir(exp, create=False)
    ev_fix = "run `armlab prepare EXP` first"
    ev_manifest = _complete_manifest(wd.eval_dir, ev_fix)
    ev_files = [f["name"] for f in ev_manifest["files"]]
    tok_fix = "run `armlab tokenizer EXP` first"
    tok_manifest = _complete_manifest(wd.tokenizer_dir, tok_fix)
    _check_tokenizer_spec(exp, tok_manifest, str(wd.tokenizer_dir))
    _check_tokenizer_files(wd.tokenizer_dir, tok_manifest)
    ev_local = _local_state(
        "eval set",
        wd.eval_dir,
        ev_files,
        {f["name"]: f["sha256"] for f in ev_manifest["files"]},
        ev_fix,
        concurrency,
    )
    tok_local = _local_state("tokenizer", wd.tokenizer_dir, _tokenizer_files(), None, tok_fix, concurrency)
    opts: dict[str, Any] = {"concurrency": concurrency, "replace": replace, "retry": retry}
    return [
        _upload_dir(
            "eval set", "eval set", wd.eval_dir, ev_files, ev_local, parse_az_uri(uris["eval"]), **opts
        ),
        _upload_dir(
            "tokenizer",
            "tokenizer",
            wd.tokenizer_dir,
            _tokenizer_files(),
            tok_local,
            parse_az_uri(uris["tokenizer"]),
            **opts,
        ),
    ]


def _check_same_spec(exp: Any, spec: Any, eval_dir: Path, manifest: dict[str, Any], where: str) -> None:
    """A published arm must come from this experiment's pool, eval set, shard layout and arm
    selection: one from another eval set may hold this experiment's eval docs (DESIGN.md
    invariant 2). The eval set is compared when it is prepared here (it is what training uses)."""
    from armlab.data.prepare import arm_selection
    from armlab.spec import fingerprint_diff

    ours: dict[str, Any] = {"shards": exp.shards.model_dump()}
    if spec.kind != "prebuilt":  # a prebuilt arm's selection names its source files, unknown here
        ours["selection"] = arm_selection(exp, spec)
    if (eval_dir / MANIFEST_NAME).is_file():
        ev = read_json(eval_dir / MANIFEST_NAME)
        if "eval_fingerprint" in manifest:  # a prepared prebuilt arm records the eval set it excluded
            ours["eval_fingerprint"] = ev.get("fingerprint")
        else:
            ours.update({k: ev.get(k) for k in ("pool_fingerprint", "eval_cut")})
    diff = fingerprint_diff(ours, {k: manifest.get(k) for k in ours})
    if diff:
        raise ArmlabError(
            f"{where}: published from a different spec ({', '.join(diff[:4])} differ{' ...' if len(diff) > 4 else ''}); "
            f"pull it into an experiment whose pool, eval, shards and arm {spec.name!r} match, or prepare the arm here"
        )


def _remote_manifest(az: AzPath, what: str, retry: RetrySettings) -> tuple[bytes, dict[str, Any]]:
    """The published manifest.json under `az` (bytes, parsed); refuses a missing or incomplete one.
    `what` names the thing (e.g. "a published arm") and how to make it, for the errors."""
    from azure.core.exceptions import ResourceNotFoundError

    auth = auth_from_env()
    bc = service_client(auth, threads=1, retry=retry).get_blob_client(az.container, az.prefix + MANIFEST_NAME)

    def get() -> bytes | None:
        try:
            return bc.download_blob().readall()
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "BlobNotFound":
                return None
            raise

    data = _retrying(get, az.uri(MANIFEST_NAME), retry, threading.Event(), auth)
    if data is None:
        raise ArmlabError(f"{az.uri()}: no {MANIFEST_NAME}, so this is not {what}")
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ArmlabError(
            f"{az.uri(MANIFEST_NAME)}: not an armlab manifest ({e}); publish it again"
        ) from None
    if manifest.get("complete") is not True:
        raise ArmlabError(f"{az.uri(MANIFEST_NAME)}: not complete; rerun `armlab publish` on the source host")
    return data, manifest


def _shard_hashes(manifest: dict[str, Any], where: str) -> dict[str, str]:
    try:
        return {f["name"]: f["sha256"] for f in manifest["files"]}
    except (KeyError, TypeError) as e:
        raise ArmlabError(
            f"{where}: not an armlab manifest (no files[].name/sha256: {e}); publish it again"
        ) from None


def _pull_dir(
    az: AzPath,
    dest: Path,
    manifest_bytes: bytes,
    files: list[str],
    sha256: dict[str, str] | None,
    *,
    mode: str,
    concurrency: int,
    retry: RetrySettings,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Download `files` of the published dir `az` into `dest`; verify them (Content-MD5 on the way,
    then `sha256` from the manifest where given, then `check`); write manifest.json last.

    A local manifest that is not the published one is removed first, so the dir stops looking
    complete before any file changes; top-level parquet files the published dir lacks are removed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    local_manifest = dest / MANIFEST_NAME
    if local_manifest.exists() and local_manifest.read_bytes() != manifest_bytes:
        local_manifest.unlink()
    for p in sorted(dest.glob("*.parquet")):  # top level only: the tokenizer dir's sample/ is not ours
        if p.name not in files and not p.name.startswith("."):
            p.unlink()
    download_prefix(az.uri(), dest, mode=mode, concurrency=concurrency, only=files, retry=retry)
    record = read_download_record(dest)
    wrong = [n for n in files if sha256 is not None and record["files"][n]["sha256"] != sha256[n]]
    if wrong:
        for n in wrong:
            (dest / n).unlink(missing_ok=True)
        raise ArmlabError(
            f"{az.uri()}: {len(wrong)} shard(s) differ from the published manifest's sha256 ({_preview(wrong)}); "
            "deleted them: publish it again"
        )
    if check is not None:
        try:
            check(dest)
        except ArmlabError:
            for n in files:  # which file is wrong is not known: none is kept, a rerun fetches all
                (dest / n).unlink(missing_ok=True)
            raise
    atomic_write_bytes(local_manifest, manifest_bytes)


def pull(
    exp: Any,
    arm: str,
    from_uri: str | None = None,
    *,
    mode: str | None = None,
    concurrency: int | None = None,
    force: bool = False,
    retry: RetrySettings | None = None,
) -> Path:
    """Download a published arm (see `publish`) into the arm's data dir; returns the data dir.

    Refused while a run leases the dir. The published manifest must say complete; each shard is
    verified (MD5 in transit and at rest, then sha256 against the manifest) before the manifest is
    written locally, last, so the dir only looks complete when it is. The arm must match this
    experiment's spec and, when the eval set is here, the eval set it was prepared against.
    """
    spec = exp.arm(arm)
    uri = from_uri or (spec.uri if spec.uri and spec.uri.startswith("az://") else None)
    if uri is None:
        raise ArmlabError(
            f"arm {arm!r} has no az:// uri in the experiment file; pass --from az://<container>/<prefix>"
        )
    az = parse_az_uri(uri)
    retry = retry or RetrySettings()
    wd = open_workdir(exp)
    data_dir = wd.data_dir(arm)
    check_writable(data_dir, force=force, action="pull into it")

    manifest_bytes, manifest = _remote_manifest(
        az,
        "a published arm; publish one with `armlab publish`, or use raw prebuilt shards as a "
        "kind='prebuilt' arm through `armlab prepare`",
        retry,
    )
    files = _shard_hashes(manifest, az.uri(MANIFEST_NAME))
    _check_same_spec(exp, spec, wd.eval_dir, manifest, az.uri(MANIFEST_NAME))
    _pull_dir(
        az,
        data_dir,
        manifest_bytes,
        sorted(files),
        files,
        mode=mode or spec.download_mode,
        concurrency=concurrency or spec.concurrency,
        retry=retry,
    )
    console.print(f"pulled {arm} from {az.uri()} into {data_dir} ({len(files)} shard(s), sha256 verified)")
    return data_dir


def _refuse_if_training(exp: Any, wd: Any, force: bool, action: str) -> None:
    """No shared asset changes under a live run: every run of the experiment reads them. A lease
    from another host counts as live (as for arms) unless `force`; dead runs' leases do not count."""
    for spec in exp.arms:
        lease = read_lease(wd.data_dir(spec.name))
        if lease is not None and lease.alive and (lease.local or not force):
            raise ArmlabError(
                f"{wd.data_dir(spec.name)}: refusing to {action}: live {lease.describe()} uses it; "
                "wait for it or stop it" + ("" if lease.local else " (if it is dead, rerun with --force)")
            )


@dataclass
class _SharedDir:
    """One shared asset to pull: where it is published, where it goes, what verifies it."""

    kind: str  # "eval set" | "tokenizer"
    az: AzPath
    dest: Path
    manifest_bytes: bytes
    manifest: dict[str, Any]
    files: list[str]
    sha256: dict[str, str] | None  # the eval manifest lists its shards' sha256; the tokenizer's does not
    check: Callable[[Path], None] | None = None

    def same_as(self, here: dict[str, Any]) -> bool:
        """Is the complete local manifest `here` the same asset? By content, not by when or where
        it was made: the same shards for an eval set, the same fingerprint for a tokenizer."""
        if self.sha256 is not None:
            return _shard_hashes(here, str(self.dest)) == self.sha256
        return here.get("fingerprint") == self.manifest.get("fingerprint")


def pull_shared(
    exp: Any,
    from_uri: str,
    *,
    mode: str = "bulk",
    concurrency: int = 8,
    force: bool = False,
    retry: RetrySettings | None = None,
) -> dict[str, Path]:
    """Download the eval set and tokenizer published by `publish_shared` into this workdir.

    Both published manifests must be complete and of this experiment's spec. An eval set or
    tokenizer already here is kept when it is the same one (same shard sha256s / tokenizer
    fingerprint) and refused when it differs, unless `force` replaces it (runs trained with the
    old one no longer compare). Nothing changes while a run of the experiment is live. Files are
    verified (Content-MD5, eval shards' sha256, the tokenizer's fingerprint) and each dir's
    manifest is written last. Returns {"eval": eval dir, "tokenizer": tokenizer dir}.
    """
    uris = shared_uris(from_uri)
    retry = retry or RetrySettings()
    wd = open_workdir(exp)
    how = f"run `armlab publish EXP --shared --to {from_uri}` on the host that prepared the experiment"
    ev_az, tok_az = parse_az_uri(uris["eval"]), parse_az_uri(uris["tokenizer"])
    ev_bytes, ev_manifest = _remote_manifest(ev_az, f"a published eval set; {how}", retry)
    tok_bytes, tok_manifest = _remote_manifest(tok_az, f"a published tokenizer; {how}", retry)
    ev_files = _shard_hashes(ev_manifest, ev_az.uri(MANIFEST_NAME))
    _check_eval_spec(exp, ev_manifest, ev_az.uri(MANIFEST_NAME))
    _check_tokenizer_spec(exp, tok_manifest, tok_az.uri(MANIFEST_NAME))
    assets = [
        _SharedDir("eval set", ev_az, wd.eval_dir, ev_bytes, ev_manifest, sorted(ev_files), ev_files),
        _SharedDir(
            "tokenizer",
            tok_az,
            wd.tokenizer_dir,
            tok_bytes,
            tok_manifest,
            _tokenizer_files(),
            None,
            lambda d: _check_tokenizer_files(d, tok_manifest),
        ),
    ]

    todo = []
    for a in assets:
        path = a.dest / MANIFEST_NAME
        here = read_json(path) if path.is_file() else None
        if here is None or here.get("complete") is not True:
            todo.append(a)  # nothing here yet, or an interrupted pull: download (resumes)
        elif a.same_as(here):
            console.print(
                f"{a.dest}: already holds the published {a.kind} ({a.az.uri()}); nothing to pull",
                soft_wrap=True,
            )
        elif force:
            todo.append(a)
        else:
            raise ArmlabError(
                f"{a.dest}: holds a different {a.kind} than {a.az.uri()}; runs trained with one do not compare "
                "with runs trained with the other: pull into a fresh workdir, or pass --force to replace it"
            )
    if todo:
        _refuse_if_training(exp, wd, force, f"write the experiment's {' and '.join(a.kind for a in todo)}")
    for a in todo:
        _pull_dir(
            a.az,
            a.dest,
            a.manifest_bytes,
            a.files,
            a.sha256,
            mode=mode,
            concurrency=concurrency,
            retry=retry,
            check=a.check,
        )
        console.print(
            f"pulled the {a.kind} from {a.az.uri()} into {a.dest} ({len(a.files)} file(s), verified)",
            soft_wrap=True,
        )
    return {"eval": wd.eval_dir, "tokenizer": wd.tokenizer_dir}
