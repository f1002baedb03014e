"""Azure Blob credentials from the environment (`auth_from_env`), for `armlab.store.azure`.

The order is the one Azure users expect (az CLI, azcopy, adlfs):

1. `AZURE_STORAGE_CONNECTION_STRING`
2. `AZURE_STORAGE_ACCOUNT` + `AZURE_STORAGE_KEY` (shared key)
3. `AZURE_STORAGE_SAS_TOKEN` with `AZURE_STORAGE_ACCOUNT` or an account URL
4. `DefaultAzureCredential` (managed identity, `az login`, ...) when azure-identity is installed
5. anonymous access (public containers) when only the account or its URL is known

`AZURE_STORAGE_BLOB_ENDPOINT` (or `AZURE_STORAGE_ACCOUNT_URL`) overrides the endpoint, e.g. to point
at Azurite or a sovereign cloud. No secret is ever shown: messages here name the variable, and
`armlab.store.redact` removes the key, the SAS token and their fields from anything else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from armlab.errors import ArmlabError
from armlab.store.redact import redact

ENV_VARS = (
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_STORAGE_BLOB_ENDPOINT",
    "AZURE_STORAGE_ACCOUNT_URL",
)


@dataclass(frozen=True)
class BlobAuth:
    """Where to connect and with what; `source` names the env vars used (never their values)."""

    account_url: str
    credential: Any  # None (anonymous) | SAS str | {"account_name", "account_key"} | TokenCredential
    source: str


def _check_endpoint(url: str, where: str) -> str:
    """`url` when the SDK can use it as an account URL (http(s)://host[:port][/path]); else one
    line naming where it came from, without its secrets (urllib would raise "Invalid IPv6 URL"
    from inside the SDK for `http://[::1`, and a URL without a host fails only at the first call)."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:
        ok = False
    if not ok:
        raise ArmlabError(
            f"{where} {redact(url)!r} is not a valid endpoint URL; expected http(s)://<host>[:port][/<account>] "
            "(e.g. https://<account>.blob.core.windows.net)"
        )
    return url


def _parse_connection_string(cs: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in cs.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return fields


def _check_key(key: str, where: str) -> None:
    """An account key is base64 (88 characters from the portal); anything else can only fail, after
    the SDK's retries, as an opaque 'access denied'. Say so at once, without echoing the key."""
    import base64
    import binascii

    try:
        base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise ArmlabError(
            f"{where} is not a valid account key (not base64, {len(key)} characters); copy the key again "
            "from the storage account's 'Access keys' page"
        ) from None


def auth_from_env(env: Mapping[str, str] | None = None) -> BlobAuth:
    """Resolve the account URL and credential from the environment (order in the module doc)."""
    env = os.environ if env is None else env
    endpoint = (env.get("AZURE_STORAGE_BLOB_ENDPOINT") or env.get("AZURE_STORAGE_ACCOUNT_URL") or "").rstrip(
        "/"
    )
    account = env.get("AZURE_STORAGE_ACCOUNT", "")
    override = " with AZURE_STORAGE_BLOB_ENDPOINT" if env.get("AZURE_STORAGE_BLOB_ENDPOINT") else ""
    if endpoint:
        _check_endpoint(
            endpoint,
            "AZURE_STORAGE_BLOB_ENDPOINT"
            if env.get("AZURE_STORAGE_BLOB_ENDPOINT")
            else "AZURE_STORAGE_ACCOUNT_URL",
        )

    if cs := env.get("AZURE_STORAGE_CONNECTION_STRING"):
        f = _parse_connection_string(cs)
        name = f.get("accountname", "")
        if f.get("usedevelopmentstorage", "").lower() == "true":
            raise ArmlabError(
                "AZURE_STORAGE_CONNECTION_STRING: UseDevelopmentStorage=true is not supported; "
                "give AccountName, AccountKey and BlobEndpoint explicitly"
            )
        url = endpoint or f.get("blobendpoint", "").rstrip("/")
        if url and not endpoint:
            _check_endpoint(url, "AZURE_STORAGE_CONNECTION_STRING's BlobEndpoint")
        if not url:
            if not name:
                raise ArmlabError(
                    "AZURE_STORAGE_CONNECTION_STRING has neither AccountName nor BlobEndpoint; check its value"
                )
            protocol = f.get("defaultendpointsprotocol", "https")
            suffix = f.get("endpointsuffix", "core.windows.net")
            url = _check_endpoint(
                f"{protocol}://{name}.blob.{suffix}",
                "AZURE_STORAGE_CONNECTION_STRING's AccountName / DefaultEndpointsProtocol / EndpointSuffix give",
            )
        if f.get("accountkey"):
            if not name:
                raise ArmlabError(
                    "AZURE_STORAGE_CONNECTION_STRING has AccountKey but no AccountName; check its value"
                )
            _check_key(f["accountkey"], "AZURE_STORAGE_CONNECTION_STRING's AccountKey")
            cred: Any = {"account_name": name, "account_key": f["accountkey"]}
        elif f.get("sharedaccesssignature"):
            cred = f["sharedaccesssignature"]
        else:
            cred = None
        return BlobAuth(url, cred, "AZURE_STORAGE_CONNECTION_STRING" + override)

    url = endpoint or (f"https://{account}.blob.core.windows.net" if account else "")
    if account and not endpoint:
        _check_endpoint(url, "AZURE_STORAGE_ACCOUNT gives")
    if account and env.get("AZURE_STORAGE_KEY"):
        _check_key(env["AZURE_STORAGE_KEY"], "AZURE_STORAGE_KEY")
        return BlobAuth(
            url,
            {"account_name": account, "account_key": env["AZURE_STORAGE_KEY"]},
            "AZURE_STORAGE_ACCOUNT + AZURE_STORAGE_KEY" + override,
        )
    if env.get("AZURE_STORAGE_KEY"):
        raise ArmlabError(
            "AZURE_STORAGE_KEY is set but AZURE_STORAGE_ACCOUNT is not; set the account name too"
        )
    if not url:
        raise ArmlabError(
            "no Azure storage account configured: set AZURE_STORAGE_CONNECTION_STRING, or AZURE_STORAGE_ACCOUNT "
            "with AZURE_STORAGE_KEY or AZURE_STORAGE_SAS_TOKEN (or `az login` with azure-identity installed)"
        )
    if sas := env.get("AZURE_STORAGE_SAS_TOKEN"):
        return BlobAuth(url, sas.lstrip("?"), "AZURE_STORAGE_SAS_TOKEN" + override)
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        return BlobAuth(
            url, None, "anonymous access (no key, SAS token or azure-identity found in the environment)"
        )
    return BlobAuth(url, DefaultAzureCredential(), "DefaultAzureCredential")
