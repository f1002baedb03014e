"""How a pool file's bytes reach the passes: the fetch plan, and the bounded download cache.

`fetch_plan` decides once per prepare. `[pool] fetch = "columns"` (the default) reads remote
parquet in place, column-pruned (`armlab.data.ranged`), in both passes; `"files"` downloads the
text pass's files whole; a store that ignores Range (an 8-byte probe) gets whole downloads in
both passes, said once. jsonl is always downloaded whole: it is read whole anyway, and a
download is retried cleanly where a half-parsed stream is not.

Downloads go into `<workdir>/cache/pool/` a few files ahead of their use (`Prefetcher`), by the
storage seam's downloader (`armlab.store.download`): under a temp name renamed when complete and
verified (size, the listed version on every read, Content-MD5 where the store keeps one),
retried with backoff (a retry resumes), recorded in the cache's `.armlab-blobs.json` (a rerun
reuses a cached file only if it is still the version listed), and deleted once used unless
keep_cache: a 1.6 TB pool never needs 1.6 TB of disk, a dropped connection costs one segment,
and a full disk is one line naming the cache, the bytes needed and the bytes free.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from armlab.data.pool import PoolFile, split_uri
from armlab.spec import PoolSpec
from armlab.store import RangesIgnored, Retry, open_store, redact
from armlab.store.download import Downloader, Record, part_path


@dataclass(frozen=True)
class FetchPlan:
    """How the passes get each remote file's bytes: read in place (column-pruned ranged reads,
    or a stream for jsonl) or downloaded whole into the cache first."""

    mode: str  # [pool] fetch: "columns" | "files"
    ranges: bool = True  # the store honours Range requests

    def downloads(self, pf: PoolFile, text_pass: bool) -> bool:
        if not pf.remote:
            return False
        if not self.ranges or pf.fmt != "parquet":
            return True  # no ranged reads, or jsonl (read whole anyway; a download retries cleanly)
        return text_pass and self.mode == "files"  # the key pass reads its few columns in place


def fetch_plan(spec: PoolSpec, files: list[PoolFile]) -> FetchPlan:
    """The plan for this pool: `[pool] fetch`, after one ranged read of a remote parquet file's
    last 8 bytes to see that the store honours Range (else whole files, said once here)."""
    probe = next((f for f in files if f.remote and f.fmt == "parquet"), None)
    if probe is None:
        return FetchPlan(spec.fetch)
    try:
        open_store(probe.path).read(probe.entry, max(0, probe.size - 8), probe.size)
    except RangesIgnored:
        from armlab.progress import console

        console.print(
            f"[yellow]pool.uri {redact(spec.uri)}: the server ignores HTTP Range requests; "
            "downloading whole files instead (once for the key pass, once for the text pass)",
            soft_wrap=True,
        )
        return FetchPlan("files", ranges=False)
    return FetchPlan(spec.fetch)


def cache_path(pf: PoolFile, cache_dir: Path) -> Path:
    """Where a downloaded file goes: its URI (credentials redacted) under `cache_dir`."""
    protocol, rest = split_uri(pf.name)
    return cache_dir / (protocol or "local") / rest.lstrip("/")


def fetch_file(pf: PoolFile, cache_dir: Path, retry: Retry | None = None, record: Record | None = None) -> Path:
    """Download a remote pool file into the cache (verified, resumable; see the module doc).

    A file already in the cache from the listed version is reused (a resumed prepare); one that
    changed on the server since it was listed is refused (its keys were read from the old one).
    """
    dest = cache_path(pf, cache_dir)
    rel = dest.relative_to(cache_dir).as_posix()
    record = record or Record(cache_dir, "")
    entry = pf.entry
    if record.current(entry, rel, cache_dir):
        return dest
    downloader = Downloader(open_store(entry.url, retry), cache_dir, record, follow_changes=False, sha256=False)
    try:
        return downloader.fetch(entry, rel)
    except BaseException:
        part_path(cache_dir, rel).unlink(missing_ok=True)  # the cache holds nothing half-written
        record.forget(rel)
        raise


class Prefetcher:
    """Downloads remote files a few ahead of their use into a bounded cache.

    `get(i)` returns file i's local path, waiting for its download, or None when the file is
    read in place (`download(pf)` is false: local files, and remote parquet read column-pruned);
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
        retry: Retry | None = None,
        download: Callable[[PoolFile], bool] = lambda pf: pf.remote,
    ):
        self.files, self.cache_dir, self.download = files, cache_dir, download
        self.order = [i for i in order if download(files[i])]
        self.ahead, self.keep_cache, self.retry = max(1, ahead), keep_cache, retry
        self.record: Record | None = None  # the cache's download record, read when first needed
        self.pool = ThreadPoolExecutor(max_workers=self.ahead)
        self.futures: dict[int, Future[Path]] = {}
        self.next = 0  # position in `order` of the next file to submit

    def _submit(self, i: int) -> None:
        if self.record is None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.record = Record(self.cache_dir, "")
        self.futures[i] = self.pool.submit(fetch_file, self.files[i], self.cache_dir, self.retry, self.record)

    def _fill(self) -> None:
        while self.next < len(self.order) and len(self.futures) < self.ahead:
            self._submit(self.order[self.next])
            self.next += 1

    def get(self, i: int) -> Path | None:
        self._fill()
        if not self.download(self.files[i]):
            return None if self.files[i].remote else Path(self.files[i].path)
        if i not in self.futures:  # asked out of order: fetch it now
            self._submit(i)
        return self.futures[i].result()

    def release(self, i: int) -> None:
        fut = self.futures.pop(i, None)
        if fut is not None and not self.keep_cache:
            with contextlib.suppress(Exception):
                self._drop(fut.result())
        self._fill()

    def _drop(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        if self.record is not None:
            self.record.forget(path.relative_to(self.cache_dir).as_posix())

    def close(self) -> None:
        for fut in self.futures.values():
            fut.cancel()
        self.pool.shutdown(wait=True)
        if not self.keep_cache:
            for i, fut in list(self.futures.items()):
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._drop(fut.result())
                self.futures.pop(i)
