"""http(s):// stores: listing by fsspec's HTTPFileSystem (a server's directory index page, nginx
`autoindex on`, Apache, `python -m http.server`; one HEAD a file for its size, ETag and
Last-Modified), reads by our own GETs on its aiohttp session so that each one can say which
version it wants and be checked against the one it got:

- `If-Match: <ETag>` (or `If-Unmodified-Since: <Last-Modified>`) on every read: a server that
  honours it (nginx, Apache, object stores) answers 412 for a replaced file;
- the answer's ETag / Last-Modified and Content-Range's total size must be the listed ones (for
  servers that ignore the condition); a whole body for a ranged request is `RangesIgnored`.

Every request (listing, HEAD, GET) waits at most `Retry.timeout` seconds for the server to
connect or to send the next bytes (aiohttp's sock_connect / sock_read), so a server that accepts
and never answers costs `timeout` per attempt and is said, not 300 s of silence. The pool URL's
query (a token, a signature) goes on every request of that pool as parameters, never into names.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from armlab.store.base import Entry
from armlab.store.fsspec import FsspecStore, version_of
from armlab.store.net import Changed, RangesIgnored, Retry, status_of

CHUNK = 1 << 20
HEAD_THREADS = 16  # HEADs in flight while listing


def strip_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment=""))


class HttpStore(FsspecStore):
    def __init__(self, scheme: str, query: str = "", retry: Retry | None = None):
        self.query = query
        self.params = dict(parse_qsl(query, keep_blank_values=True))
        super().__init__(scheme, retry)

    def _filesystem(self) -> Any:
        import aiohttp
        from fsspec.implementations.http import HTTPFileSystem

        t = self.retry.timeout
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=t, sock_read=t)
        kwargs: dict[str, Any] = {"client_kwargs": {"timeout": timeout}, "skip_instance_cache": True}
        if self.params:
            kwargs["params"] = self.params  # on every request fsspec makes (index pages, HEADs)
        return HTTPFileSystem(**kwargs)

    def _path(self, url: str) -> str:
        return strip_query(url)  # the query travels as `params`

    def url_of(self, path: str) -> str:
        return f"{path}?{self.query}" if self.query else path

    # -- listing
    def _find(self, url: str) -> dict[str, dict[str, Any]]:
        fs, path = self.fs, self._path(url)
        magic = any(c in path for c in "*?[")
        if not path.endswith("/") and not magic:
            info = self._head(path)  # a file, or a dir URL that answers with its index page
            if info.get("mimetype") != "text/html":
                return {path: info}
        root = path[: min((path.find(c) for c in "*?[" if c in path), default=len(path))]
        fs.ls(root if not magic else root.rsplit("/", 1)[0])  # fsspec's walk skips pages it cannot read
        found = super()._find(path)
        # Index pages give names only: one HEAD a file for its size, ETag and Last-Modified.
        todo = [n for n, i in found.items() if i.get("type", "file") == "file" and i.get("size") is None]
        with ThreadPoolExecutor(HEAD_THREADS) as pool:
            for name, info in zip(todo, pool.map(self._head, todo), strict=True):
                found[name] = {**found[name], **info}
        return found

    def _info(self, url: str) -> Entry:
        return self.entry(self._head(self._path(url)))

    def _head(self, path: str) -> dict[str, Any]:
        """fsspec's HEAD (then GET) of one URL. fsspec turns every failure of both into a
        FileNotFoundError; only a 404 is one: a refused connection or a 500 is raised as itself,
        so the retry layer retries it and the message says the server could not be reached."""
        try:
            return self.fs.info(path)
        except FileNotFoundError as e:
            cause = e.__cause__
            if cause is None or isinstance(cause, FileNotFoundError) or status_of(cause) == 404:
                raise
            raise cause from None

    # -- reading
    def _read(self, entry: Entry, start: int, end: int) -> bytes:
        from io import BytesIO

        buf = BytesIO()
        self._get(entry, buf, start, end, lambda n: None, 1)
        return buf.getvalue()

    def _get(self, entry: Entry, f: IO[bytes], start: int, end: int, on_bytes: Any, concurrency: int) -> None:
        from fsspec.asyn import sync

        sync(self.fs.loop, self._aget, entry, f, start, end, on_bytes)

    async def _aget(self, entry: Entry, f: IO[bytes], start: int, end: int, on_bytes: Any) -> None:
        session = await self.fs.set_session()
        whole = start == 0 and end >= entry.size > 0
        headers = {"Accept-Encoding": "identity", **({} if whole else {"Range": f"bytes={start}-{end - 1}"})}
        tag, _, value = entry.version.partition(":")
        if tag == "etag" and not value.startswith("W/"):
            headers["If-Match"] = f'"{value}"'
        elif tag == "mtime":
            headers["If-Unmodified-Since"] = value
        url = self._path(entry.url)
        async with session.get(url, headers=headers, params=self.params or None) as r:
            if r.status == 412:
                raise Changed(entry.url, f"the server no longer has {entry.version}")
            if r.status == 404:
                raise FileNotFoundError("404: deleted on the server since it was listed")
            r.raise_for_status()
            self._check_answer(entry, r, whole)
            async for chunk in r.content.iter_chunked(CHUNK):
                f.write(chunk)
                on_bytes(len(chunk))

    def _check_answer(self, entry: Entry, r: Any, whole: bool) -> None:
        """The answer must be the listed version, and the range asked for."""
        if not whole and r.status != 206:
            raise RangesIgnored(entry.url)
        total = r.headers.get("Content-Range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else r.content_length if whole else None
        now = version_of(
            {k: r.headers[k] for k in ("ETag", "Content-MD5", "Last-Modified") if k in r.headers}
        )
        tag = entry.version.partition(":")[0]
        if (entry.size and size is not None and size != entry.size) or (
            entry.version and now.partition(":")[0] == tag and now != entry.version
        ):
            raise Changed(
                entry.url,
                f"listed {entry.version or 'size'} {entry.size:,} bytes; the server sent {now or 'size'} "
                f"{size if size is not None else '?'} bytes",
            )
