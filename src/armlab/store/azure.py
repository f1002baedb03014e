"""az://container/prefix stores: Azure Blob Storage through the azure-storage-blob SDK, as a thin
adapter behind the seam (credentials: `armlab.store.azure_auth`, in the order Azure users expect).

The SDK's own retries are off (retry_total=0): the seam's `Retry` is the one retry loop, so
ARMLAB_NET_ATTEMPTS / _BACKOFF / _TIMEOUT mean the same here as for pools. Reads carry the listed
ETag as an If-Match condition (a blob replaced since is `Changed`, never spliced); uploads set
Content-MD5 (checked by the service in transit, stored for readers to check at rest).

Why not adlfs (the fsspec filesystem for Azure): its reads cannot carry If-Match, its client is
built inside its constructor with the SDK's retries (3 more tries, 15 s apart, under ours), and it
requires azure-identity, which would make `DefaultAzureCredential` the answer where this order
gives anonymous access. What the seam needs from Azure is these seven calls.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from typing import IO, Any

from armlab.errors import ArmlabError
from armlab.store.azure_auth import auth_from_env
from armlab.store.base import Entry, Store
from armlab.store.net import Changed, Retry
from armlab.store.redact import redact

# Azure's container naming rule: 3-63 chars, lowercase letters, digits and single hyphens.
CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")
POOL_CONNECTIONS = 64  # per client; connections are opened as requests need them


@dataclass(frozen=True)
class AzPath:
    """`az://container/prefix`; the prefix is a folder ("" or ending in "/")."""

    container: str
    prefix: str

    def uri(self, name: str = "") -> str:
        return f"az://{self.container}/{self.prefix}{name}"


def parse_az_uri(uri: str) -> AzPath:
    """Split `az://container/prefix`. The prefix names a folder: `az://c/top16` is `top16/`."""
    if not uri.startswith("az://"):
        raise ArmlabError(f"{uri!r}: not an Azure blob uri; expected az://<container>/<prefix>")
    container, _, prefix = uri.removeprefix("az://").partition("/")
    if not CONTAINER_RE.match(container):
        raise ArmlabError(
            f"{uri}: {container!r} is not a valid container name (3-63 lowercase letters, digits and hyphens)"
        )
    prefix = prefix.strip("/")
    return AzPath(container, prefix + "/" if prefix else "")


def _split(url: str) -> tuple[str, str]:
    az = parse_az_uri(url)
    return az.container, url.removeprefix(f"az://{az.container}/")


class AzureStore(Store):
    scheme = "az"

    def __init__(self, retry: Retry | None = None):
        super().__init__(retry)
        self.auth = auth_from_env()
        self.endpoint = redact(self.auth.account_url.split("?")[0])
        self._client: Any = None

    def client(self) -> Any:
        """A BlobServiceClient without retries of its own, waiting at most `Retry.timeout`."""
        if self._client is None:
            import requests
            from azure.core.pipeline.transport import RequestsTransport
            from azure.storage.blob import BlobServiceClient

            session = requests.Session()  # requests keeps 10 connections a host unless told
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_CONNECTIONS)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._client = BlobServiceClient(
                account_url=self.auth.account_url,
                credential=self.auth.credential,
                transport=RequestsTransport(session=session, session_owner=True),
                retry_total=0,
                connection_timeout=self.retry.timeout,
                read_timeout=self.retry.timeout,
            )
        return self._client

    def _blob(self, url: str) -> Any:
        container, name = _split(url)
        return self.client().get_blob_client(container, name)

    def entry(self, container: str, props: Any) -> Entry:
        md5 = props.content_settings.content_md5
        return Entry(
            f"az://{container}/{props.name}",
            int(props.size),
            str(props.etag).strip('"'),
            bytes(md5).hex() if md5 else None,
        )

    # -- listing
    def _list(self, url: str) -> list[Entry]:
        """A prefix's blobs (`az://c/p` is the folder `p/`), a glob's, or the one blob `url` names."""
        container, rest = _split(url)
        pattern = rest if any(c in rest for c in "*?[") else None
        prefix = rest[: min(rest.find(c) for c in "*?[" if c in rest)] if pattern else rest.strip("/")
        prefix = prefix + "/" if prefix and not pattern and not prefix.endswith("/") else prefix
        cc = self.client().get_container_client(container)
        out = []
        for props in cc.list_blobs(name_starts_with=prefix, include=["metadata"]):
            if props.name.endswith("/") or (props.metadata or {}).get("hdi_isfolder") == "true":
                continue  # folder placeholders of hierarchical accounts
            if pattern is None or fnmatch.fnmatchcase(props.name, pattern):
                out.append(self.entry(container, props))
        if not out and rest and not pattern and not rest.endswith("/"):
            try:  # not a folder: perhaps the one blob
                return [self._info(url)]
            except Exception as e:
                if getattr(e, "error_code", None) != "BlobNotFound":
                    raise
        return out

    def _info(self, url: str) -> Entry:
        container, _ = _split(url)
        return self.entry(container, self._blob(url).get_blob_properties())

    # -- reading
    def _download(self, entry: Entry, start: int, end: int, **kw: Any) -> Any:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceModifiedError

        cond = {"etag": f'"{entry.version}"', "match_condition": MatchConditions.IfNotModified}
        try:
            return self._blob(entry.url).download_blob(
                offset=start, length=end - start, **(cond if entry.version else {}), **kw
            )
        except ResourceModifiedError:
            raise Changed(entry.url, f"listed ETag {entry.version}; the blob was replaced") from None

    def _read(self, entry: Entry, start: int, end: int) -> bytes:
        return self._download(entry, start, end).readall()

    def _get(self, entry: Entry, f: IO[bytes], start: int, end: int, on_bytes: Any, concurrency: int) -> None:
        seen = 0

        def hook(current: int, _total: int | None) -> None:
            nonlocal seen
            on_bytes(current - seen)
            seen = current

        self._download(entry, start, end, max_concurrency=concurrency, progress_hook=hook).readinto(f)

    def _cat(self, url: str) -> bytes | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._blob(url).download_blob().readall()
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "BlobNotFound":
                return None
            raise

    # -- writing
    def _put(self, path: str, url: str, md5: str, content_type: str, on_bytes: Any, concurrency: int) -> None:
        from azure.storage.blob import ContentSettings

        seen = 0

        def hook(current: int, _total: int | None) -> None:
            nonlocal seen
            on_bytes(current - seen)
            seen = current

        with open(path, "rb") as f:
            self._blob(url).upload_blob(
                f,
                length=os.path.getsize(path),
                overwrite=True,
                validate_content=True,  # per-request MD5 checked by the service (in transit)
                content_settings=ContentSettings(
                    content_type=content_type or None,
                    content_md5=bytearray.fromhex(md5),  # stored: what readers verify against
                ),
                max_concurrency=concurrency,
                progress_hook=hook,
            )

    def _delete(self, url: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            self._blob(url).delete_blob()
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) != "BlobNotFound":
                raise

    # -- messages
    def explain(self, e: BaseException, where: str) -> ArmlabError | None:
        from azure.core.exceptions import ClientAuthenticationError

        code = getattr(e, "error_code", None)
        code = str(getattr(code, "value", code) or "")
        status = getattr(e, "status_code", None)
        if code == "ContainerNotFound":
            return ArmlabError(
                f"{where}: container not found at {self.endpoint}; check its name (armlab never creates "
                "containers: `az storage container create --name <container>`)"
            )
        if isinstance(e, ClientAuthenticationError) or status in (401, 403):
            return ArmlabError(
                f"{where}: access denied by {self.endpoint} ({code or status}) with credentials from "
                f"{self.auth.source}; check the key or SAS token and its permissions (read+list to "
                "download, write+delete to publish)"
            )
        return None
