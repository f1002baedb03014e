"""Real HTTP servers on loopback for remote-pool tests and `bench/remote.py`.

- `PoolServer`: aiohttp serving a directory the way nginx does (`autoindex on`: an HTML index
  whose links end in "/" for folders; ETag and Last-Modified; Range parsed by aiohttp's own
  `request.http_range`, answered 206 with Content-Range; If-Match answered 412 when the file's
  ETag differs). It counts the body bytes it actually wrote, can throttle every connection
  together to `rate` bytes/s (a shared link), can cut the connection partway through its first
  `drops` ranged responses, can demand `?token=` on every request (401 without), calls
  `before_get(path)` before it serves a file's bytes (a test changes the file there), with
  `conditional=False` ignores If-Match like a server that does not implement it, and answers its
  first `fails` GETs of a file 503 (a server that fails, then answers).
- `SilentServer`: a socket that accepts connections and never answers.
- `NoRangeServer`: the standard library's `http.server` (what `python -m http.server` runs),
  which answers every GET with the whole file: a real server that ignores Range.
- `HubServer`: a `PoolServer` that also answers the few Hugging Face hub routes HfFileSystem
  calls for one dataset repo (repo info, paginated tree listing, paths-info, `resolve` with
  Range), so the real huggingface_hub code runs end to end with HF_ENDPOINT pointing here; with
  `repo_type="model"` the same routes for a model repo (what `snapshot_download` calls).

Each server runs its own event loop (or threads) in a daemon thread of the calling process;
use them as context managers.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import http.server
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from aiohttp import web

CHUNK = 64 << 10


@dataclass
class Hit:
    method: str
    path: str
    range: tuple[int, int] | None  # [start, end) served, None for a whole body
    status: int
    sent: int  # body bytes written


@dataclass
class Log:
    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, hit: Hit) -> None:
        with self.lock:
            self.hits.append(hit)

    @property
    def sent(self) -> int:
        with self.lock:
            return sum(h.sent for h in self.hits)

    def file_bytes(self, name: str) -> int:
        """Body bytes sent of files whose path ends with `name`."""
        with self.lock:
            return sum(h.sent for h in self.hits if h.path.endswith(name) and h.method == "GET")

    def clear(self) -> None:
        with self.lock:
            self.hits.clear()


def etag(path: Path) -> str:
    st = path.stat()
    return f'"{st.st_mtime_ns:x}-{st.st_size:x}"'  # nginx's form: mtime and size in hex


class PoolServer:
    """Serve `root` on 127.0.0.1 (see the module doc)."""

    def __init__(
        self,
        root: Path,
        rate: float | None = None,
        drops: int = 0,
        drop_after: int = 20_000,
        token: str | None = None,
        before_get: Any = None,
        conditional: bool = True,
        fails: int = 0,
    ):
        self.root, self.rate, self.drops, self.drop_after = Path(root), rate, drops, drop_after
        self.token, self.before_get, self.conditional = token, before_get, conditional
        self.fails = fails
        self.log = Log()
        self.loop = asyncio.new_event_loop()
        self._link_free = 0.0  # when the shared link is next free (monotonic seconds)
        self.port = 0

    # -- life cycle
    def routes(self, app: web.Application) -> None:
        app.router.add_get("/{path:.*}", self.static)

    def __enter__(self) -> PoolServer:
        ready = threading.Event()

        async def start() -> None:
            app = web.Application()
            self.routes(app)
            self.runner = web.AppRunner(app, access_log=None)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- serving
    async def static(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None and request.query.get("token") != self.token:
            raise web.HTTPUnauthorized()
        rel = unquote(request.match_info["path"])
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.exists():
            raise web.HTTPNotFound()
        if path.is_dir():
            if rel and not rel.endswith("/"):
                raise web.HTTPMovedPermanently(f"/{quote(rel)}/")
            return self.index(request, path)
        if request.method == "GET" and self.fails > 0:
            self.fails -= 1
            self.log.add(Hit(request.method, request.path, None, 503, 0))
            raise web.HTTPServiceUnavailable()
        if request.method == "GET" and self.before_get is not None:
            self.before_get(path)
        if self.conditional and request.headers.get("If-Match", etag(path)) != etag(path):
            raise web.HTTPPreconditionFailed()  # nginx: the file is no longer the version asked for
        return await self.send_file(request, path, {"ETag": etag(path)})

    def index(self, request: web.Request, path: Path) -> web.Response:
        links = [
            f'<a href="{quote(p.name)}{"/" if p.is_dir() else ""}">{html.escape(p.name)}</a>'
            for p in sorted(path.iterdir())
        ]
        body = (
            f"<html><body><h1>Index of {html.escape(request.path)}</h1><pre>\n"
            + "\n".join(links)
            + "\n</pre></body></html>"
        )
        self.log.add(Hit(request.method, request.path, None, 200, len(body)))
        return web.Response(text=body, content_type="text/html")

    async def send_file(
        self, request: web.Request, path: Path, headers: dict[str, str]
    ) -> web.StreamResponse:
        size = path.stat().st_size
        headers = {
            **headers,
            "Accept-Ranges": "bytes",
            "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(path.stat().st_mtime)),
        }
        try:
            rng = request.http_range
        except ValueError:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"}) from None
        start, end, status = 0, size, 200
        if request.headers.get("Range"):
            start = rng.start if rng.start is not None else 0
            start = max(0, size + start) if start < 0 else start
            end = min(size, rng.stop) if rng.stop is not None else size
            if start >= size:
                raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start
        resp.content_type = "application/octet-stream"
        # Logged before anything is sent, counted as it goes: a client never sees a byte the log lacks.
        hit = Hit(request.method, request.path, (start, end) if status == 206 else None, status, 0)
        self.log.add(hit)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        cut = self.drops > 0 and status == 206 and end - start > self.drop_after
        if cut:
            self.drops -= 1
        with open(path, "rb") as f:
            f.seek(start)
            while hit.sent < end - start:
                n = min(CHUNK, end - start - hit.sent)
                if cut and hit.sent + n > self.drop_after:
                    n = self.drop_after - hit.sent
                await self.throttle(n)
                hit.sent += n
                await resp.write(f.read(n))
                if cut and hit.sent >= self.drop_after:
                    assert request.transport is not None
                    request.transport.abort()  # the connection drops mid-body
                    return resp
        await resp.write_eof()
        return resp

    async def throttle(self, n: int) -> None:
        """Hold `n` bytes until the shared link has had time to carry them."""
        if not self.rate:
            return
        now = time.monotonic()
        start = max(now, self._link_free)
        self._link_free = start + n / self.rate
        if start > now:
            await asyncio.sleep(start - now)


class NoRangeServer:
    """`python -m http.server` on `root`: every GET is answered 200 with the whole file."""

    def __init__(self, root: Path):
        self.root, self.log = Path(root), Log()

    def __enter__(self) -> NoRangeServer:
        log, root = self.log, str(self.root)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a: Any, **kw: Any):
                super().__init__(*a, directory=root, **kw)

            def copyfile(self, source: Any, outputfile: Any) -> None:
                data = source.read()
                try:
                    outputfile.write(data)
                finally:
                    log.add(Hit(self.command, self.path, None, 200, len(data)))

            def log_message(self, *a: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


class SilentServer:
    """A loopback socket that accepts connections and never answers (a hung server)."""

    def __enter__(self) -> SilentServer:
        import socket

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[Any] = []
        self.stop = threading.Event()

        def accept() -> None:
            self.sock.settimeout(0.2)
            while not self.stop.is_set():
                try:
                    self.conns.append(self.sock.accept()[0])  # held open, never read or answered
                except OSError:
                    continue

        self.thread = threading.Thread(target=accept, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for c in self.conns:
            c.close()
        self.sock.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"


# -- the hub ---------------------------------------------------------------------------------------
def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubServer(PoolServer):
    """The hub routes for dataset `repo` whose files are those under `root` (see the module doc).
    Tree listings come `page_size` entries a page (the hub's cursor + Link header pagination)."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(
        self, root: Path, repo: str = "armlab/pool", page_size: int = 3, repo_type: str = "dataset", **kw: Any
    ):
        super().__init__(root, **kw)
        self.repo, self.page_size, self.repo_type = repo, page_size, repo_type

    def routes(self, app: web.Application) -> None:
        model = self.repo_type == "model"
        base = "/api/models/{ns}/{name}" if model else "/api/datasets/{ns}/{name}"
        app.router.add_get(base, self.repo_info)
        app.router.add_get(base + "/revision/{rev}", self.repo_info)
        app.router.add_get(base + "/tree/{rev}", self.tree)
        app.router.add_get(base + "/tree/{rev}/{path:.*}", self.tree)
        app.router.add_post(base + "/paths-info/{rev}", self.paths_info)
        resolve = "/{ns}/{name}/resolve/{rev}/{path:.*}" if model else "/datasets/{ns}/{name}/resolve/{rev}/{path:.*}"
        app.router.add_get(resolve, self.resolve)

    def _check(self, request: web.Request) -> None:
        if f"{request.match_info['ns']}/{request.match_info['name']}" != self.repo:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound"}, text='{"error": "Repository not found"}'
            )

    def entry(self, p: Path) -> dict[str, Any]:
        rel = p.relative_to(self.root).as_posix()
        if p.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(rel.encode()).hexdigest(), "path": rel}
        data = p.read_bytes()
        return {
            "type": "file",
            "oid": git_blob_oid(data),
            "size": len(data),
            "path": rel,
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134},
        }

    async def repo_info(self, request: web.Request) -> web.Response:
        self._check(request)
        files = [p.relative_to(self.root).as_posix() for p in sorted(self.root.rglob("*")) if p.is_file()]
        body = {
            "id": self.repo,
            "sha": self.COMMIT,
            "private": False,
            "siblings": [{"rfilename": f} for f in files],
        }
        return self.json(request, body)

    async def tree(self, request: web.Request) -> web.Response:
        self._check(request)
        rel = unquote(request.match_info.get("path", "")).strip("/")
        top = self.root / rel
        if not top.is_dir():
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"}, text='{"error": "not found"}')
        recursive = request.query.get("recursive", "false").lower() == "true"
        entries = sorted(top.rglob("*") if recursive else top.iterdir())
        cursor = int(request.query.get("cursor", 0))
        page = entries[cursor : cursor + self.page_size]
        headers = {}
        if cursor + self.page_size < len(entries):
            q = {**request.query, "cursor": str(cursor + self.page_size)}
            nxt = request.url.with_query(q)
            headers["Link"] = f'<{nxt}>; rel="next"'
        return self.json(request, [self.entry(p) for p in page], headers)

    async def paths_info(self, request: web.Request) -> web.Response:
        self._check(request)
        form = await request.post()
        paths = [str(p) for p in form.getall("paths", [])]
        return self.json(request, [self.entry(self.root / p) for p in paths if (self.root / p).exists()])

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        self._check(request)
        path = self.root / unquote(request.match_info["path"])
        if not path.is_file():
            raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        e = self.entry(path)
        headers = {
            "ETag": f'"{e["lfs"]["oid"]}"',
            "X-Repo-Commit": self.COMMIT,
            "X-Linked-Size": str(e["size"]),
        }
        return await self.send_file(request, path, headers)

    def json(self, request: web.Request, body: Any, headers: dict[str, str] | None = None) -> web.Response:
        text = json.dumps(body)
        self.log.add(Hit(request.method, request.path, None, 200, len(text)))
        return web.Response(text=text, content_type="application/json", headers=headers)


# -- pools -----------------------------------------------------------------------------------------
def widen(paths: list[Path], nbytes: int = 1000, seed: int = 0) -> None:
    """Give each pool file a `vec` column of `nbytes` random bytes a row (an embedding no arm
    reads), keeping its row groups, so column pruning has something to leave on the server."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    for p in paths:
        f = pq.ParquetFile(p)
        rg_rows = f.metadata.row_group(0).num_rows
        t = f.read()
        vec = pa.array([rng.bytes(nbytes) for _ in range(t.num_rows)], pa.binary())
        pq.write_table(t.append_column("vec", vec), p, row_group_size=rg_rows)
