"""The storage seam: every byte armlab reads from or writes to a remote store goes through one
interface, `Store`, with one retry / timeout / error layer (`armlab.store.net`) and one redaction
function (`armlab.store.redact`).

    store = open_store("https://host/pool/")      # by the URL's scheme
    files = store.list("https://host/pool/")      # Entry(url, size, version, md5, name) each
    data = store.read(files[0], 0, 1024)          # refused if the file is no longer that version

Backends, one file each: `fsspec` (any fsspec protocol: file://, s3://, gs://, ...), `http`
(http(s)://: fsspec's listing, our own conditional ranged GETs), `hf` (the Hugging Face hub,
reads pinned to the commit that was listed), `azure` (az://container/prefix, the Azure SDK).
On top, for any store: `download` (verified, resumable downloads of a prefix or one file into a
local dir, with a record of what was listed) and `upload` (a dir with its manifest last).

What the seam promises, whatever the backend:

- every call is retried on transient failures (`Retry`: ARMLAB_NET_ATTEMPTS / _BACKOFF /
  _TIMEOUT) and ends, when it cannot succeed, in one redacted line naming the URL;
- a read is of the version that was listed (`Entry.version`: an ETag, a content hash, a
  modification time): a file replaced since raises `Changed` instead of mixing two versions;
- a URL's secrets (userinfo, query tokens) go on the request only: names shown and recorded are
  `Entry.name`, redacted. `${VAR}` in a URL is taken from the environment at request time, so an
  experiment file (and its frozen copy) can name a secret without holding it.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from armlab.errors import ArmlabError
from armlab.store.base import Entry, Store, expand
from armlab.store.net import Changed, RangesIgnored, Retry
from armlab.store.redact import redact

__all__ = [
    "Changed",
    "Entry",
    "RangesIgnored",
    "Retry",
    "Store",
    "expand",
    "is_remote",
    "open_store",
    "probe",
    "redact",
]


# -- which store --------------------------------------------------------------------------------------
def is_remote(uri: str) -> bool:
    """A URL with a scheme (`hf://`, `https://`, `az://`, `file://`, ...), not a local path."""
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri or ""))


def scheme_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower()


def probe(uri: str, timeout: float | None = None) -> str | None:
    """None when `uri` can be listed now (one attempt, each request waiting at most `timeout` s
    or ARMLAB_NET_TIMEOUT, whichever is less), else the one line saying why (doctor)."""
    retry = Retry.from_env()
    retry = replace(retry, attempts=1, timeout=min(retry.timeout, timeout or retry.timeout))
    try:
        open_store(uri, retry).list(uri)
    except ArmlabError as e:
        return str(e)
    return None


_STORES: dict[tuple[Any, ...], Store] = {}
_LOCK = threading.Lock()


def open_store(uri: str, retry: Retry | None = None) -> Store:
    """The store for `uri`'s scheme (cached per process: a forked worker opens its own)."""
    scheme = scheme_of(uri)
    key: tuple[Any, ...] = (os.getpid(), scheme, retry, _config_key(uri, scheme))
    with _LOCK:
        if key not in _STORES:
            try:
                _STORES[key] = _new_store(scheme, uri, retry)
            except ArmlabError as e:
                raise ArmlabError(f"{redact(uri)}: {e}") from None
        return _STORES[key]


def _config_key(uri: str, scheme: str) -> Any:
    """What else makes a store: an http(s) URL's query (a token there goes on every request of
    that pool), Azure's credentials and endpoint from the environment."""
    if scheme == "az":
        from armlab.store.azure_auth import ENV_VARS

        return tuple(os.environ.get(v) for v in ENV_VARS)
    if scheme not in ("http", "https"):
        return ""
    full = expand(uri)  # an unset ${VAR}, or a redacted secret, is said here naming the whole URL
    try:
        return urlsplit(full).query
    except ValueError:
        return ""


def _new_store(scheme: str, uri: str, retry: Retry | None) -> Store:
    if scheme in ("http", "https"):
        from armlab.store.http import HttpStore

        return HttpStore(scheme, expand(urlsplit(uri).query), retry)
    if scheme == "hf":
        from armlab.store.hf import HfStore

        return HfStore(retry)
    if scheme == "az":
        from armlab.store.azure import AzureStore

        return AzureStore(retry)
    from armlab.store.fsspec import FsspecStore

    return FsspecStore(scheme, retry)
