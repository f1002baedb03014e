"""Calls to the Azure SDK made safe: its errors as one scrubbed line saying what to check,
transient failures retried with exponential backoff (`RetrySettings`), and listing a prefix.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from armlab.data.blob.address import AzPath, _rel_name
from armlab.data.blob.auth import BlobAuth, RetrySettings, scrub
from armlab.errors import ArmlabError
from armlab.progress import console

T = TypeVar("T")


# -- errors and retries ----------------------------------------------------------------------------
class _BadBlob(Exception):
    """A blob that downloaded fine but is not a usable shard (not parquet, no text column)."""


class _Aborted(Exception):
    """Another worker hit a fatal error; stop without starting more work."""


class _Changed(Exception):
    """The blob was replaced on the server since it was listed (If-Match failed)."""


def _endpoint(auth: BlobAuth) -> str:
    return scrub(auth.account_url.split("?")[0])


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
