"""Verified, resumable downloads from any store into a local dir: a prefix's files
(`download_prefix`: prebuilt arms, `pull`), or one file at a time (`Downloader.fetch`: the pool's
download cache).

A dir downloaded into keeps a small record (`.armlab-blobs.json`): what the store listed (name,
size, version, Content-MD5), which files are downloaded and verified (with their md5, and
sha256 where asked), and how far each partial download got. From it:

- a rerun skips files whose version and size are unchanged and whose file is on disk;
- a partial download (`.<name>.part`, killed process or dropped connection) continues from the
  last segment that was fsynced and recorded; every read names the listed version, so a file
  replaced on the server restarts from zero (`follow_changes`) or is refused, never spliced;
- `skip_download=True` uses what is on disk after re-hashing it against the record, offline.

Integrity: size and version always; Content-MD5 when the store keeps one (blobs uploaded in
blocks often have none: the record then says "size+etag"). A mismatch is downloaded once more,
then reported; a file gets its real name only once verified (and passes `check`). A full disk is
one line naming the dir, the bytes the file needs and the bytes free. Failures are retried by the
store's one retry loop (a retry resumes), then reported as one line; rerunning resumes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.progress import byte_counter, console, progress
from armlab.store import Entry, Retry, Store, open_store
from armlab.store.net import Aborted, Changed
from armlab.text import plural
from armlab.workdir import atomic_write_json, cleanup_temp_files, read_json

RECORD_NAME = ".armlab-blobs.json"
SEGMENT_BYTES = 64 << 20  # unit of resumption: fsynced and recorded before the next one starts
HASH_CHUNK = 8 << 20


def hash_file(path: Path, sha256: bool = True) -> tuple[str, str]:
    """(md5, sha256) hex of a file in one pass (hashlib releases the GIL: threads hash in
    parallel); sha256 '' unless asked."""
    md5, sha = hashlib.md5(), hashlib.sha256() if sha256 else None
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            md5.update(chunk)
            if sha is not None:
                sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest() if sha is not None else ""


def preview(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


def size_text(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def disk_full(dest: Path, shown: str, need: int) -> ArmlabError:
    free = shutil.disk_usage(dest if dest.exists() else dest.parent).free
    return ArmlabError(
        f"{dest}: disk full downloading {shown}: it needs {size_text(need)} more, {size_text(free)} free; "
        "free space there (or move the workdir), then rerun the same command to resume"
    )


class BadFile(Exception):
    """A file that downloaded fine but is not usable (the caller's `check` said why)."""


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
    ignored: list[str] = field(default_factory=list)  # files under the prefix that were not wanted
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes_fetched / self.seconds / 1e6 if self.seconds else 0.0


def listing_json(e: Entry) -> dict[str, Any]:
    return {"name": e.shown, "size": e.size, "etag": e.version, "content_md5": e.md5}


class Record:
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

    def current(self, e: Entry, rel: str, dest: Path) -> bool:
        """Is `rel` on disk, downloaded from this version of `e`?"""
        f = self.files.get(rel)
        p = dest / rel
        return (
            bool(f)
            and f["etag"] == e.version
            and f["size"] == e.size
            and p.is_file()
            and p.stat().st_size == e.size
        )

    def forget(self, rel: str) -> None:
        with self.lock:
            self.files.pop(rel, None)
            self.partial.pop(rel, None)
        self.save()


def part_path(dest: Path, rel: str) -> Path:
    final = dest / rel
    return final.parent / f".{final.name}.part"


class Downloader:
    """Downloads entries of one store into `dest` (see the module doc), one `fetch` per thread."""

    def __init__(
        self,
        store: Store,
        dest: Path,
        record: Record,
        report: FetchReport | None = None,
        on_bytes: Callable[[int], None] = lambda n: None,
        range_concurrency: int = 1,
        check: Callable[[str, Path], str | None] | None = None,
        follow_changes: bool = True,
        sha256: bool = True,
    ):
        self.store, self.dest, self.record = store, dest, record
        self.report = report or FetchReport(uri="", dest=dest)
        self.on_bytes, self.range_concurrency, self.check = on_bytes, range_concurrency, check
        self.follow_changes, self.sha256 = follow_changes, sha256
        self.abort = threading.Event()
        self.stats_lock = threading.Lock()

    def fetch(self, entry: Entry, rel: str) -> Path:
        try:
            return self._fetch(entry, rel)
        except (BadFile, Aborted):
            raise
        except BaseException:
            self.abort.set()  # stop the other workers now, not when the main thread gets to it
            raise

    def _fetch(self, entry: Entry, rel: str) -> Path:
        if self.abort.is_set():
            raise Aborted
        if entry.size < 0:
            raise ArmlabError(
                f"{entry.shown}: the store does not give this file's size, so a download of it cannot be "
                "verified or resumed; serve it with a Content-Length"
            )
        final, part = self.dest / rel, part_path(self.dest, rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        for try_no in (1, 2):
            entry = self._download(entry, rel, part)
            md5, sha256 = hash_file(part, self.sha256)
            size = part.stat().st_size
            if size != entry.size:
                problem = f"downloaded {size:,} bytes, the blob has {entry.size:,}"
            elif entry.md5 and md5 != entry.md5:
                problem = "content does not match the blob's Content-MD5"
            else:
                break
            part.unlink(missing_ok=True)
            self.record.forget(rel)
            if try_no == 2:
                raise ArmlabError(
                    f"{entry.shown}: {problem} after 2 downloads (corrupted on the server?); "
                    "nothing was kept: re-upload the blob or remove it from the prefix"
                )
            console.print(f"[yellow]{entry.shown}: {problem}; downloading it again", soft_wrap=True)
        if self.check is not None and (bad := self.check(rel, part)):
            part.unlink(missing_ok=True)
            self.record.forget(rel)
            raise BadFile(f"{rel} ({bad})")
        os.replace(part, final)
        with self.record.lock:
            self.record.files[rel] = {
                **listing_json(entry),
                "md5": md5,
                "sha256": sha256,
                "verified": "size+etag+content-md5" if entry.md5 else "size+etag (blob has no Content-MD5)",
            }
            self.record.partial.pop(rel, None)
        self.record.save()
        with self.stats_lock:
            self.report.fetched += 1
            if not entry.md5:
                self.report.no_md5.append(rel)
        return final

    def _download(self, entry: Entry, rel: str, part: Path) -> Entry:
        """Bring `part` to the file's full size, continuing a recorded partial, through the store's
        retry loop (each attempt resumes); a file replaced on the server starts again from zero
        with its new version (`follow_changes`), else is refused."""
        changes = 0
        while True:
            try:
                self.store.call(lambda e=entry: self._segments(e, rel, part), entry.shown, self.abort)
                return entry
            except Changed:
                part.unlink(missing_ok=True)
                with self.record.lock:
                    self.record.partial.pop(rel, None)
                changes += 1
                if not self.follow_changes:
                    raise
                if changes >= self.store.retry.attempts:
                    raise ArmlabError(
                        f"{entry.shown}: the blob kept changing on the server ({changes} times while downloading); "
                        "rerun when it is stable"
                    ) from None
                console.print(
                    f"[yellow]{entry.shown}: changed on the server while downloading; starting it again"
                )
                entry = replace(self.store.info(entry.url), name=entry.name)

    def _segments(self, entry: Entry, rel: str, part: Path) -> None:
        with self.record.lock:
            state = self.record.partial.get(rel)
        done = 0
        if state and state["etag"] == entry.version and state["size"] == entry.size and part.exists():
            done = min(int(state["done"]), part.stat().st_size)
        if done:
            with self.stats_lock:
                self.report.bytes_resumed += done
        with self.record.lock:
            self.record.partial[rel] = {"etag": entry.version, "size": entry.size, "done": done}
        free = shutil.disk_usage(part.parent).free
        if free < entry.size - done:
            raise disk_full(self.dest, entry.shown, entry.size - done)
        try:
            fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
            with os.fdopen(fd, "r+b") as f:
                f.truncate(done)  # bytes past the recorded point may be holes from parallel range writes
                while done < entry.size:
                    if self.abort.is_set():
                        raise Aborted
                    n = min(SEGMENT_BYTES, entry.size - done)
                    f.seek(done)
                    self.store._get(entry, f, done, done + n, self.on_bytes, self.range_concurrency)
                    if f.tell() != done + n:
                        raise ConnectionError(
                            f"short read: {f.tell() - done:,} of {n:,} bytes at offset {done:,}"
                        )
                    f.flush()
                    os.fsync(f.fileno())
                    done += n
                    with self.stats_lock:
                        self.report.bytes_fetched += n
                    with self.record.lock:
                        self.record.partial[rel]["done"] = done
                    self.record.save()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full(self.dest, entry.shown, entry.size - done) from None
            raise


def download_file(url: str, dest: Path, retry: Retry | None = None) -> Path:
    """The one file at `url` into `dest` (model weights, a bundle): verified and resumable like
    any download here (the record sits beside `dest`), with a progress bar; reused while the
    store still lists the same version."""
    store = open_store(url, retry)
    entry = store.info(url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    record = Record(dest.parent, "")
    if record.current(entry, dest.name, dest.parent):
        return dest
    with progress(transient=True) as bar:
        task = bar.add_task(f"download {entry.shown}", total=entry.size, unit="B", bytes=0)
        on_bytes = byte_counter(bar, task, also_completed=True)
        return Downloader(store, dest.parent, record, on_bytes=on_bytes, sha256=False).fetch(entry, dest.name)


def download_prefix(
    uri: str,
    dest: str | Path,
    *,
    mode: str = "bulk",
    concurrency: int = 8,
    skip_download: bool = False,
    only: list[str] | None = None,
    retry: Retry | None = None,
    check: Callable[[str, Path], str | None] | None = None,
    suffix: str = ".parquet",
) -> FetchReport:
    """Download the files under `uri` whose names end with `suffix` into `dest` (verified,
    resumable; see the module doc), `check(name, path)` saying why one is not usable (or None).

    `only`: names (relative to the prefix) to fetch instead, of any type; all must exist. The
    caller then owns the rest of `dest` (no check for other files there).
    """
    store = open_store(uri, retry)
    prefix = uri.rstrip("/") + "/"
    dest = Path(dest)
    if mode not in ("bulk", "sequential"):
        raise ArmlabError(f"download mode {mode!r}: expected 'bulk' or 'sequential'")
    if concurrency < 1:
        raise ArmlabError(f"concurrency {concurrency}: must be >= 1")
    if skip_download:
        return _verify_on_disk(prefix, dest, concurrency, suffix)
    t0 = time.time()
    listed = {e.url.removeprefix(prefix): e for e in store.list(prefix)}
    unsafe = [rel for rel in listed if not _safe(rel)]
    if unsafe:
        raise ArmlabError(f"{prefix}{unsafe[0]}: name cannot be mapped to a local file safely; rename it")
    if only is not None:
        missing = [n for n in only if n not in listed]
        if missing:
            raise ArmlabError(
                f"{prefix}: {plural(len(missing), 'expected blob')} missing ({preview(missing)})"
            )
        wanted, ignored = {n: listed[n] for n in only}, []
    else:
        wanted = {r: e for r, e in listed.items() if r.endswith(suffix)}
        ignored = sorted(set(listed) - set(wanted))
    if not wanted:
        found = f" (it holds only: {preview(ignored)})" if ignored else ""
        raise ArmlabError(
            f"{prefix}: no {suffix} blobs under this prefix{found}; check the container and prefix"
        )
    if ignored:
        console.print(
            f"{prefix}: skipping {plural(len(ignored), f'blob not ending in {suffix}')}: {preview(ignored)}"
        )

    dest.mkdir(parents=True, exist_ok=True)
    cleanup_temp_files(dest)  # a record write cut short by a kill (partial files are `.part`, kept)
    record = Record(dest, prefix)
    # Files downloaded earlier that the prefix no longer holds would be read as shards: remove.
    stale = [rel for rel in record.files if rel not in wanted]
    for rel in stale:
        (dest / rel).unlink(missing_ok=True)
        record.files.pop(rel)
    if stale:
        console.print(
            f"{dest}: removed {plural(len(stale), 'file')} no longer under {prefix}: {preview(stale)}"
        )
    stray = sorted(_local_files(dest, suffix) - set(wanted)) if only is None else []
    if stray:
        raise ArmlabError(
            f"{dest}: holds {suffix} files that are not under {prefix} ({preview(stray)}); "
            "remove them (this dir must hold only the download)"
        )
    record.listing = {rel: listing_json(e) for rel, e in wanted.items()}
    record.ignored = ignored
    record.partial = {k: v for k, v in record.partial.items() if k in wanted}
    record.save()

    todo = {rel: e for rel, e in wanted.items() if not record.current(e, rel, dest)}
    report = FetchReport(
        uri=prefix, dest=dest, blobs=len(wanted), skipped=len(wanted) - len(todo), ignored=ignored
    )
    report.no_md5 = [rel for rel, e in wanted.items() if not e.md5 and rel not in todo]
    if todo:
        _run_downloads(store, prefix, dest, record, todo, mode, concurrency, report, check)
    report.seconds = time.time() - t0
    total = sum(e.size for e in wanted.values())
    console.print(
        f"{prefix}: {plural(len(wanted), 'file')}, {total / 1e6:,.1f} MB in {dest}: {report.fetched} downloaded "
        f"({report.bytes_fetched / 1e6:,.1f} MB at {report.mb_per_s:,.1f} MB/s), {report.skipped} already verified"
        + (f"; {len(report.no_md5)} had no Content-MD5 (verified by size+ETag)" if report.no_md5 else "")
    )
    return report


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and not any(p in ("", ".", "..") for p in parts)


def _local_files(dest: Path, suffix: str) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob(f"*{suffix}") if not p.name.startswith(".")}


def _run_downloads(
    store: Store,
    prefix: str,
    dest: Path,
    record: Record,
    todo: dict[str, Entry],
    mode: str,
    concurrency: int,
    report: FetchReport,
    check: Callable[[str, Path], str | None] | None,
) -> None:
    # bulk: files in parallel; with fewer files than `concurrency`, the spare concurrency goes to
    # parallel ranges within each file (where the store can). sequential: one request at a time.
    threads = min(concurrency, len(todo)) if mode == "bulk" else 1
    range_concurrency = max(1, concurrency // threads) if mode == "bulk" else 1
    with progress() as prog:
        task = prog.add_task(
            f"download {prefix}", total=report.blobs, completed=report.skipped, unit="files", bytes=0
        )
        fetcher = Downloader(store, dest, record, report, byte_counter(prog, task), range_concurrency, check)
        bad: list[str] = []
        errors: list[BaseException] = []
        ex = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="armlab-download")
        try:
            futures = [ex.submit(fetcher.fetch, e, rel) for rel, e in todo.items()]
            for fut in as_completed(futures):
                try:
                    fut.result()
                    prog.advance(task)
                except BadFile as e:
                    bad.append(str(e))
                    prog.advance(task)
                except Aborted:
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
        raise errors[0]
    if bad:
        raise ArmlabError(
            f"{prefix}: {plural(len(bad), 'blob')} not usable as shards: {preview(bad, 2)}; every .parquet blob needs a "
            "string 'text' column: remove them from the prefix (nothing of them was kept)"
        )


def _verify_on_disk(prefix: str, dest: Path, concurrency: int, suffix: str) -> FetchReport:
    """--skip-download: check that every listed file is on disk and hashes as recorded."""
    t0 = time.time()
    if not (dest / RECORD_NAME).exists():
        raise ArmlabError(
            f"{dest}: --skip-download, but nothing was downloaded here yet ({RECORD_NAME} missing); run without --skip-download"
        )
    record = Record(dest, prefix)
    if record.previous_uri != prefix:
        raise ArmlabError(
            f"{dest}: --skip-download, but this dir holds a download of {record.previous_uri}, not {prefix}; "
            "run without --skip-download"
        )
    missing = [rel for rel in record.listing if rel not in record.files or not (dest / rel).is_file()]
    if missing:
        raise ArmlabError(
            f"--skip-download: {len(missing)} of {plural(len(record.listing), 'blob')} of {prefix} not on disk in {dest} "
            f"({preview(missing)}); rerun without --skip-download to fetch them"
        )
    stray = sorted(_local_files(dest, suffix) - set(record.listing))
    if stray:
        raise ArmlabError(
            f"{dest}: holds {suffix} files that are not under {prefix} ({preview(stray)}); remove them"
        )

    def check(rel: str) -> str | None:
        want = record.files[rel]
        p = dest / rel
        if p.stat().st_size != want["size"] or hash_file(p, False)[0] != want["md5"]:
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
            f"--skip-download: {plural(len(corrupt), 'file')} in {dest} changed since download ({preview(corrupt)}); "
            "deleted them: rerun without --skip-download to fetch them again"
        )
    report = FetchReport(uri=prefix, dest=dest, blobs=len(names), skipped=len(names), ignored=record.ignored)
    report.no_md5 = [rel for rel in names if not record.files[rel].get("content_md5")]
    report.seconds = time.time() - t0
    console.print(
        f"{prefix}: --skip-download: {plural(len(names), 'file')} in {dest} verified against the download record"
    )
    return report


def read_download_record(dest: str | Path) -> dict[str, Any]:
    """The download record of `dest` (what was verified), e.g. for provenance."""
    return read_json(Path(dest) / RECORD_NAME)
