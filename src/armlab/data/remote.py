"""Remote pool stores: one fsspec filesystem per protocol, every network call retried with
backoff, ranged reads that notice a server ignoring Range, and network errors as one line
naming the URL (its userinfo and any token redacted).

The filesystems are fsspec's: `hf://` is huggingface_hub's `HfFileSystem` (HF_TOKEN and
HF_ENDPOINT come from the environment, read by huggingface_hub itself), `http(s)://` is fsspec's
`HTTPFileSystem` (aiohttp), and any other protocol fsspec knows (`s3://`, `gs://`, `file://` ...)
works the same way. Errors come from aiohttp, httpx, requests, huggingface_hub or the OS in many
types; `transient` sorts them into retry-worthy (the network, 5xx, 429) and not (404, 401/403,
a bad URL, offline mode), by type and status code rather than by library.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from armlab.errors import ArmlabError

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
TRANSIENT_ERRNO = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)
# Libraries whose status-less errors are transport failures (a reset, a timeout, a cut body).
TRANSPORT_MODULES = frozenset(
    {"aiohttp", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "http"}
)
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


@dataclass(frozen=True)
class Retry:
    """`attempts` tries of each request, waiting `backoff` seconds after the first failure and
    doubling up to `max_wait`. ARMLAB_NET_ATTEMPTS / ARMLAB_NET_BACKOFF override the defaults
    (a flaky link wants more patience; the tests want less)."""

    attempts: int = 5
    backoff: float = 1.0
    max_wait: float = 30.0

    @classmethod
    def from_env(cls) -> Retry:
        return cls(
            attempts=max(1, int(os.environ.get("ARMLAB_NET_ATTEMPTS", cls.attempts))),
            backoff=float(os.environ.get("ARMLAB_NET_BACKOFF", cls.backoff)),
        )

    def wait(self, attempt: int) -> float:
        return min(self.max_wait, self.backoff * 2 ** (attempt - 1))


def filesystem(protocol: str) -> Any:
    """The fsspec filesystem for `protocol` (instances are cached by fsspec per process)."""
    import fsspec

    if protocol == "hf":
        from huggingface_hub import HfFileSystem

        return HfFileSystem()  # HF_TOKEN / HF_ENDPOINT from the environment; never passed through our logs
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        raise ArmlabError(f"pool.uri: protocol {protocol}:// is not available ({describe(e)})") from None


# -- redaction -------------------------------------------------------------------------------------
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s'\"]+@", re.I)
_BEARER = re.compile(r"(Bearer\s+)\S+", re.I)


def redact(text: str) -> str:
    """`text` without credentials: URL userinfo (`https://user:pw@host` -> `https://***@host`),
    bearer tokens and the hub token from the environment."""
    for var in TOKEN_VARS:
        if (value := os.environ.get(var)) and len(value) >= 8:
            text = text.replace(value, "***")
    return _BEARER.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


# -- errors ----------------------------------------------------------------------------------------
def describe(e: BaseException) -> str:
    """A short, redacted reason: the OS error when there is one ("[Errno 111] Connection refused"
    rather than a library's nested repr), else the first line of the message."""
    text = redact(str(e)).strip()
    if m := re.search(r"\[Errno -?\d+\] [^'\")\]]+", text):
        return m.group(0).strip()
    line = (text.splitlines() or [""])[0] or type(e).__name__
    line = line if len(line) <= 200 else line[:197] + "..."
    return line if type(e).__name__ in line else f"{type(e).__name__}: {line}"


def status_of(e: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp `.status`, httpx/requests `.response.status_code`)."""
    for obj in (e, getattr(e, "response", None)):
        for attr in ("status", "status_code"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def transient(e: BaseException) -> bool:
    """Worth retrying: the network or the server, not the request (not found, denied, bad URL)."""
    if type(e).__name__ == "OfflineModeIsEnabled" or isinstance(
        e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    ):
        return False
    if (status := status_of(e)) is not None:
        return status in TRANSIENT_STATUS or status >= 500
    if isinstance(e, ConnectionError | TimeoutError):
        return True
    if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNO:
        return True
    if isinstance(e, ValueError):  # a malformed URL, or a library's refusal (not the network)
        return False
    return type(e).__module__.split(".")[0] in TRANSPORT_MODULES


def host_of(url: str) -> str:
    """The host a URL reaches: hf:// paths the hub endpoint (HF_ENDPOINT), others their own
    ('' for hostless ones such as file://)."""
    if url.startswith("hf://"):
        url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def network_error(e: BaseException, url: str, attempts: int = 0) -> ArmlabError:
    """One line for a failed network call on `url`, saying what to check."""
    where, status = redact(url), status_of(e)
    name = type(e).__name__
    if name == "OfflineModeIsEnabled":
        return ArmlabError(
            f"{where}: HF_HUB_OFFLINE is set, so the hub cannot be reached; unset it to read this pool"
        )
    if status in (401, 403) or name == "GatedRepoError":
        return ArmlabError(
            f"{where}: access denied ({status or name}); check the credentials "
            "(for the hub: HF_TOKEN or `hf auth login`, and that the token may read the repo)"
        )
    if status == 404 or isinstance(e, FileNotFoundError) or name.endswith("NotFoundError"):
        return ArmlabError(f"{where}: not found ({describe(e)}); check the URI")
    if attempts and transient(e):
        reach = f"cannot reach {host}" if (host := host_of(url)) else "failed"
        return ArmlabError(
            f"{where}: {reach} after {attempts} attempts ({describe(e)}); "
            "check the network, then rerun the same command to resume"
        )
    return ArmlabError(f"{where}: {describe(e)}")


def retrying(fn: Callable[[], T], url: str, retry: Retry | None = None) -> T:
    """`fn()`, retrying transient failures with exponential backoff; then one line naming `url`."""
    from armlab.progress import console

    retry = retry or Retry.from_env()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except ArmlabError:
            raise
        except Exception as e:
            if not transient(e) or attempt >= retry.attempts:
                raise network_error(e, url, attempt if attempt > 1 else 0) from None
            wait = retry.wait(attempt)
            console.print(
                f"[yellow]{redact(url)}: {describe(e)}; retrying in {wait:.1f}s ({attempt}/{retry.attempts - 1})",
                soft_wrap=True,
            )
            time.sleep(wait)


# -- ranged reads ----------------------------------------------------------------------------------
class RangesIgnored(ArmlabError):
    """The server answered a ranged request with something other than that range."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url

    def __str__(self) -> str:
        return (
            f"{redact(self.url)}: the server ignores HTTP Range requests, so columns cannot be read "
            'on their own; set [pool] fetch = "files" to download whole files'
        )


def read_range(
    protocol: str, path: str, size: int, start: int, end: int, retry: Retry | None = None
) -> bytes:
    """Bytes [start, end) of a remote file, retried per range. Goes through the filesystem's file
    object so that fsspec's HTTP reader notices a server that ignores Range before the whole body
    arrives; any answer of the wrong length is refused (a cut body is retried, a whole file is
    `RangesIgnored`)."""
    url = f"{protocol}://{path}" if "://" not in path else path

    def once() -> bytes:
        try:
            with filesystem(protocol).open(path, "rb", cache_type="none", size=size) as f:
                f.seek(start)
                data = f.read(end - start)
        except ValueError as e:
            if "range" in str(e).lower():  # fsspec http: "doesn't appear to support range requests"
                raise RangesIgnored(url) from None
            raise
        if len(data) > end - start:
            raise RangesIgnored(url)
        if len(data) < end - start:
            raise ConnectionError(f"short read: {len(data)} of {end - start} bytes at offset {start}")
        return data

    return retrying(once, url, retry)


def download(url: str, dest: Path, label: str) -> None:
    """The URL's bytes into `dest` (atomically: a temp name renamed when complete), with a
    progress bar named `label`; a body shorter than its Content-Length raises ConnectionError.
    Errors are the transport's (OSError, ValueError for a bad URL): callers name what failed."""
    import urllib.request

    from armlab.progress import progress
    from armlab.workdir import atomic_path

    with (
        urllib.request.urlopen(url, timeout=60) as r,
        atomic_path(dest) as tmp,
        open(tmp, "wb") as f,
        progress(transient=True) as bar,
    ):
        size = int(r.headers.get("Content-Length") or 0) or None
        job = bar.add_task(label, total=size, unit="B", bytes=0)
        done = 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            bar.update(job, advance=len(chunk), bytes=done)
        if size is not None and done != size:
            raise ConnectionError(f"got {done} of {size} bytes")
