"""The seam's interface: `Entry` (a file as a store lists it) and `Store` (one backend: the single
attempts it implements, the retried calls everyone uses); `expand` puts `${VAR}` values into a
URL for the request. See `armlab.store` for what the seam promises.
"""

from __future__ import annotations

import io
import os
import re
import threading
from dataclasses import dataclass
from typing import IO, Any

from armlab.errors import ArmlabError
from armlab.store.net import RangesIgnored, Retry, retrying
from armlab.store.redact import MASK, redact


@dataclass(frozen=True)
class Entry:
    """One file of a store, as listed."""

    url: str  # what requests use: the full URL (it may carry credentials, so it is never shown)
    size: int  # -1: the store does not say
    version: str = ""  # what identifies these bytes ("etag:..", "sha256:..", "mtime:.."; '' unknown)
    md5: str | None = None  # hex Content-MD5 when the store keeps one
    name: str = ""  # shown and recorded; '' means redact(url)

    @property
    def shown(self) -> str:
        return self.name or redact(self.url)


class Store:
    """One backend. Public calls retry (one layer, `Retry`); subclasses implement the single
    attempts (`_list`, `_info`, `_read`, `_get`, `_cat`, `_put`, `_delete`) and raise their
    library's errors, or `Changed` / `RangesIgnored`."""

    scheme = ""
    endpoint = ""  # where the store lives, for messages when its URLs do not say (Azure's account)

    def __init__(self, retry: Retry | None = None):
        self.retry = retry or Retry.from_env()

    # -- what subclasses give
    def _list(self, url: str) -> list[Entry]:
        raise NotImplementedError

    def _info(self, url: str) -> Entry:
        raise NotImplementedError

    def _read(self, entry: Entry, start: int, end: int) -> bytes:
        raise NotImplementedError

    def _get(self, entry: Entry, f: IO[bytes], start: int, end: int, on_bytes: Any, concurrency: int) -> None:
        """Write bytes [start, end) of `entry` into `f` at its position."""
        f.write(self._read(entry, start, end))
        on_bytes(end - start)

    def _cat(self, url: str) -> bytes | None:
        raise NotImplementedError

    def _put(self, path: str, url: str, md5: str, content_type: str, on_bytes: Any, concurrency: int) -> None:
        raise ArmlabError(
            f"{redact(url)}: {self.scheme}:// is read-only to armlab; publish to az:// or file://"
        )

    def _delete(self, url: str) -> None:
        raise ArmlabError(f"{redact(url)}: {self.scheme}:// is read-only to armlab")

    def explain(self, e: BaseException, where: str) -> ArmlabError | None:
        """This store's own one line for an error it knows (None: the generic message)."""
        return None

    # -- the seam
    def call(self, fn: Any, url: str, abort: threading.Event | None = None) -> Any:
        return retrying(fn, url, self.retry, abort=abort, endpoint=self.endpoint, explain=self.explain)

    def list(self, url: str) -> list[Entry]:
        """Every file of a dir, prefix or glob, or the one file `url` names; sorted by URL."""
        return sorted(self.call(lambda: self._list(expand(url)), url), key=lambda e: e.url)

    def info(self, url: str) -> Entry:
        return self.call(lambda: self._info(expand(url)), url)

    def read(self, entry: Entry, start: int, end: int) -> bytes:
        """Bytes [start, end) of the listed version of `entry`; a short read is retried."""

        def once() -> bytes:
            data = self._read(entry, start, end)
            if len(data) > end - start:
                raise RangesIgnored(entry.url)
            if len(data) < end - start:
                raise ConnectionError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
            return data

        return self.call(once, entry.shown)

    def cat(self, url: str) -> bytes | None:
        """A small file's bytes, or None when there is no such file."""
        return self.call(lambda: self._cat(expand(url)), url)

    def put(
        self, path: str, url: str, md5: str, content_type: str = "", on_bytes: Any = None,
        concurrency: int = 1, abort: threading.Event | None = None,
    ) -> None:  # fmt: skip
        """Upload local file `path` to `url`, with its hex `md5` checked by the store where it can."""
        self.call(
            lambda: self._put(
                path, expand(url), md5, content_type, on_bytes or (lambda n: None), concurrency
            ),
            url,
            abort,
        )

    def delete(self, url: str) -> None:
        self.call(lambda: self._delete(expand(url)), url)

    def reader(self, entry: Entry) -> io.RawIOBase:
        """A seekable read-only file of `entry` (wrap it in io.BufferedReader): each read is a
        `read` of the listed version."""
        return _Reader(self, entry)


class _Reader(io.RawIOBase):
    def __init__(self, store: Store, entry: Entry):
        super().__init__()
        self.store, self.entry, self.pos = store, entry, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.entry.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b: Any) -> int:
        end = min(self.entry.size, self.pos + len(b))
        if end <= self.pos:
            return 0
        data = self.store.read(self.entry, self.pos, end)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(url: str) -> str:
    """`url` with each `${VAR}` taken from the environment (for the request only); an unset
    variable is one line naming it, and so is a secret that was redacted (a copy armlab wrote)."""
    if MASK in url:
        raise ArmlabError(
            f"{url}: its secret was redacted (armlab writes no secrets, so copies such as a workdir's "
            "experiment.toml have ***); use the experiment file, or put the secret in an environment "
            "variable and name it in the URL, e.g. ?token=${POOL_TOKEN}"
        )

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in os.environ:
            raise ArmlabError(
                f"{redact(url)}: ${{{name}}} is not set; export {name} (it holds this URL's secret)"
            )
        return os.environ[name]

    return _VAR.sub(sub, url) if "${" in url else url
