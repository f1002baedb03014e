"""The one retry / timeout / error layer every store call goes through.

`Retry` says how hard to try: `attempts` tries of each request, `backoff` seconds after the first
failure, doubling up to `max_wait`, and `timeout` seconds of silence before a request counts as
failed (a server that accepts and never answers). ARMLAB_NET_ATTEMPTS / ARMLAB_NET_BACKOFF /
ARMLAB_NET_TIMEOUT override the defaults for every store (pools, Azure blobs, downloads).

Errors come from aiohttp, httpx, requests, huggingface_hub, the Azure SDK or the OS in many types;
`transient` sorts them into retry-worthy (the network, a timeout, 5xx, 429) and not (404, 401/403,
a bad URL, offline mode) by type and status code rather than by library. `network_error` makes
the one line the user sees: the URL (redacted), what happened, what to do.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

from armlab.errors import ArmlabError
from armlab.store.redact import redact

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
# Libraries whose status-less errors are transport failures (a reset, a timeout, a cut body);
# azure-core's errors with a status (404, 403, 412, ...) are sorted by it.
TRANSPORT_MODULES = frozenset(
    {"aiohttp", "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3", "http", "azure"}
)


@dataclass(frozen=True)
class Retry:
    """How hard to try (see the module doc)."""

    attempts: int = 5
    backoff: float = 1.0
    max_wait: float = 30.0
    timeout: float = 30.0

    @classmethod
    def from_env(cls) -> Retry:
        return cls(
            attempts=max(1, int(_env_number("ARMLAB_NET_ATTEMPTS", cls.attempts, int))),
            backoff=max(0.0, _env_number("ARMLAB_NET_BACKOFF", cls.backoff, float)),
            timeout=_env_number("ARMLAB_NET_TIMEOUT", cls.timeout, float),
        )

    def wait(self, attempt: int) -> float:
        return min(self.max_wait, self.backoff * 2 ** (attempt - 1))


def _env_number(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value != value or (name == "ARMLAB_NET_TIMEOUT" and value <= 0):
        raise ArmlabError(f"{name}={raw!r}: not a valid {'count' if kind is int else 'number of seconds'}")
    return value


class Changed(ArmlabError):
    """A file's bytes are not the version that was listed (replaced on the server since)."""

    def __init__(self, url: str, detail: str):
        super().__init__(url, detail)
        self.url, self.detail = url, detail

    def __str__(self) -> str:
        return (
            f"{redact(self.url)}: changed on the server since it was listed ({self.detail}); "
            "nothing read from it was used: rerun the same command when the file is stable (it lists again)"
        )


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


# -- classifying errors ------------------------------------------------------------------------------
def describe(e: BaseException) -> str:
    """A short, redacted reason: the OS error when there is one ("[Errno 111] Connection refused"
    rather than a library's nested repr), else the first line of the message."""
    text = redact(str(e)).strip()
    if m := re.search(r"\[Errno -?\d+\] [^'\")\]]+", text):
        return m.group(0).strip()
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
        # aiohttp's connection errors are OSErrors whose text leaves the cause out ("Connect call failed")
        return f"[Errno {e.errno}] {os.strerror(e.errno)}"
    line = (text.splitlines() or [""])[0] or type(e).__name__
    line = line if len(line) <= 200 else line[:197] + "..."
    return line if type(e).__name__ in line else f"{type(e).__name__}: {line}"


def status_of(e: BaseException) -> int | None:
    """The HTTP status an error carries (aiohttp `.status`, httpx/requests `.response.status_code`,
    the Azure SDK's `.status_code`)."""
    for obj in (e, getattr(e, "response", None)):
        for attr in ("status", "status_code"):
            value = getattr(obj, attr, None)
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def is_timeout(e: BaseException) -> bool:
    """A request that got no answer in time (aiohttp's read timeout reaches us through fsspec as
    FSTimeoutError; requests and the Azure SDK raise their own kinds)."""
    return (
        isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower()
    )


def transient(e: BaseException) -> bool:
    """Worth retrying: the network or the server, not the request (not found, denied, bad URL)."""
    if isinstance(e, ArmlabError):
        return False
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


def reason(e: BaseException, retry: Retry) -> str:
    """What went wrong, for a retry line or the final message."""
    return f"no answer in {retry.timeout:g} s" if is_timeout(e) else describe(e)


def network_error(
    e: BaseException,
    url: str,
    attempts: int = 0,
    retry: Retry | None = None,
    endpoint: str = "",
    explain: Callable[[BaseException, str], ArmlabError | None] | None = None,
) -> ArmlabError:
    """One line for a failed call on `url` after `attempts` tries, saying what to check. `endpoint` is where the store
    lives when the URL does not say (Azure's account URL); `explain` gives a store's own message
    for errors it knows (a missing container, the credentials it used)."""
    where, status = redact(url), status_of(e)
    if isinstance(e, ArmlabError):
        return e
    if explain is not None and (own := explain(e, where)) is not None:
        return own
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
    host = redact(endpoint) if endpoint else host_of(url)
    retry = retry or Retry.from_env()
    if attempts and is_timeout(e):
        return ArmlabError(
            f"{where}: no answer from {host or 'the server'} in {retry.timeout:g} s "
            f"(after {attempts} attempt{'s' if attempts > 1 else ''}); "
            "check the server and the network (ARMLAB_NET_TIMEOUT sets the wait), then rerun the same command to resume"
        )
    if attempts and transient(e):
        reach = f"cannot reach {host}" if host else "failed"
        after = f" after {attempts} attempts" if attempts > 1 else ""
        return ArmlabError(
            f"{where}: {reach}{after} ({describe(e)}); check the network, then rerun the same command to resume"
        )
    return ArmlabError(f"{where}: {describe(e)}")


def retrying(
    fn: Callable[[], T],
    url: str,
    retry: Retry | None = None,
    *,
    abort: threading.Event | None = None,
    endpoint: str = "",
    explain: Callable[[BaseException, str], ArmlabError | None] | None = None,
    again: Callable[[BaseException], bool] = transient,
) -> T:
    """`fn()`, retrying failures `again` accepts (default: transient ones) with exponential
    backoff and a line each saying why and when; then one line naming `url`. `abort` (set by a
    sibling worker's fatal error) stops the loop between attempts."""
    from armlab.progress import console

    retry = retry or Retry.from_env()
    attempt = 0
    while True:
        attempt += 1
        if abort is not None and abort.is_set():
            raise Aborted
        try:
            return fn()
        except (ArmlabError, Aborted):
            raise
        except Exception as e:
            if not again(e) or attempt >= retry.attempts:
                raise network_error(e, url, attempt, retry, endpoint, explain) from None
            wait = retry.wait(attempt)
            console.print(
                f"[yellow]{redact(url)}: {reason(e, retry)} (attempt {attempt}/{retry.attempts}); "
                f"retrying in {wait:.1f}s",
                soft_wrap=True,
            )
            if abort is not None:
                abort.wait(wait)
            else:
                time.sleep(wait)


class Aborted(Exception):
    """Another worker hit a fatal error; stop without starting more work."""
