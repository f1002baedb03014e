"""Any fsspec filesystem as a store (`file://`, `s3://`, `gs://`, `memory://`, ...): listing by
its find/glob, a version from whatever it lists about a file's contents (`version_of`), ranged
reads through an uncached file object (exactly the bytes asked for) checked against that version
afterwards, writes by `put_file`.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import IO, Any

from armlab.errors import ArmlabError
from armlab.store.base import Entry, Store
from armlab.store.net import Changed, Retry, describe

CHUNK = 8 << 20  # bytes a `get` asks for at a time


def version_of(info: dict[str, Any]) -> str:
    """What a store lists about a file's contents, strongest first: a content hash (the hub's
    LFS sha256 or xet hash, a Content-MD5), then a version tag (ETag, the hub's git blob id), then
    the modification time. '' when the store lists none of these (only the size is left)."""
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


class FsspecStore(Store):
    def __init__(self, protocol: str, retry: Retry | None = None):
        super().__init__(retry)
        self.scheme = protocol
        self.fs = self._filesystem()

    def _filesystem(self) -> Any:
        import fsspec

        try:
            return fsspec.filesystem(self.scheme)
        except (ImportError, ValueError) as e:
            raise ArmlabError(
                f"protocol {self.scheme}:// is not available ({describe(e)}); install the fsspec package for it"
            ) from None

    def url_of(self, path: str) -> str:
        return path if "://" in path else f"{self.scheme}://{path}"

    def entry(self, info: dict[str, Any]) -> Entry:
        size = info.get("size")  # None: the store does not say (an HTTP answer without Content-Length)
        return Entry(self.url_of(info["name"]), -1 if size is None else int(size), version_of(info))

    # -- listing
    def _list(self, url: str) -> list[Entry]:
        return [self.entry(i) for i in self._find(url).values() if i.get("type", "file") == "file"]

    def _find(self, url: str) -> dict[str, dict[str, Any]]:
        """name -> info of the files `url` names: itself, or what a dir or glob holds."""
        fs, path = self.fs, self._path(url)
        magic = glob.has_magic(path.split("://", 1)[-1])
        if not magic and not path.endswith("/") and not fs.isdir(path):
            return {path: fs.info(path)}
        return fs.glob(path, detail=True) if magic else fs.find(path, detail=True)

    def _path(self, url: str) -> str:
        return url

    def _info(self, url: str) -> Entry:
        return self.entry(self.fs.info(self._path(url)))

    # -- reading
    def _open(self, entry: Entry) -> Any:
        """The file with no read-ahead cache: each read is exactly the range asked for."""
        return self.fs.open(self._path(entry.url), "rb", cache_type="none", size=entry.size or None)

    def _read(self, entry: Entry, start: int, end: int) -> bytes:
        with self._open(entry) as f:
            f.seek(start)
            data = f.read(end - start)
        self._check(entry)
        return data

    def _get(self, entry: Entry, f: IO[bytes], start: int, end: int, on_bytes: Any, concurrency: int) -> None:
        with self._open(entry) as src:
            src.seek(start)
            for a in range(start, end, CHUNK):
                data = src.read(min(end, a + CHUNK) - a)
                f.write(data)
                on_bytes(len(data))
                if len(data) < min(end, a + CHUNK) - a:
                    break  # short: the caller retries
        self._check(entry)

    def _check(self, entry: Entry) -> None:
        """After a read: is the file still the version listed? (A stat here; a metadata request on
        object stores.) A change refuses the bytes just read."""
        if not entry.version:
            return
        self.fs.invalidate_cache(self._path(entry.url))
        now = self._info(entry.url)
        if now.version != entry.version or (entry.size and now.size != entry.size):
            raise Changed(
                entry.url,
                f"listed {entry.version}, size {entry.size:,}; now {now.version}, size {now.size:,}",
            )

    def _cat(self, url: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._path(url))
        except FileNotFoundError:
            return None

    # -- writing
    def _put(self, path: str, url: str, md5: str, content_type: str, on_bytes: Any, concurrency: int) -> None:
        target = self._path(url)
        self.fs.makedirs(self.fs._parent(target), exist_ok=True)
        self.fs.put_file(path, target)
        on_bytes(os.path.getsize(path))

    def _delete(self, url: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(url))
