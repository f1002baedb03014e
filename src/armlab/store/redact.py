"""The one redaction function: secrets out of any text armlab shows or writes.

A URL is used in clear only for the request itself. Everything else (messages, progress lines,
manifests, the frozen experiment, `init --from`'s scaffold, cache paths) gets `redact(text)`:

- URL userinfo: `https://user:pw@host` -> `https://***@host`;
- query and connection-string values whose name says secret: `token`, `sig`, `key`, `password`,
  `secret`, `signature`, `credential`, `code`, `X-Amz-*` / `X-Goog-*` signing fields (an Azure SAS
  keeps its readable fields, `sv=...&sp=rl&sig=***`), `AccountKey=`, `SharedAccessSignature=`;
- auth headers quoted in errors: `Bearer ...`, `SharedKey account:...`;
- the literal values of the secrets armlab reads from the environment (HF_TOKEN, the Azure key,
  SAS token and connection string's key), plain and URL-encoded, wherever they appear.

A `${VAR}` in their place is kept: it names the secret, the request takes its value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from urllib.parse import quote

MASK = "***"
# Environment variables whose values are secrets (never shown, wherever they turn up).
SECRET_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN")

_VAR = r"\$\{[A-Za-z_]\w*\}"  # `${VAR}`: a name for a secret, not one (kept)
_USERINFO = re.compile(rf"(\b[a-z][a-z0-9+.-]*://)(?!{_VAR}(?::{_VAR})?@)[^/@\s'\"]+@", re.I)
# name=value after ?, &, ; or the start of a word: the value goes when the name says secret.
_SECRET_PARAM = re.compile(
    r"((?:^|(?<=[?&;\s\"']))(?:[\w.-]*(?:token|secret|passw(?:or)?d|pwd|signature|credential|key)[\w.-]*"
    rf"|sig|code|auth|x-amz-[\w-]+|x-goog-[\w-]+)=)(?!{_VAR})([^&;\s#'\"]+)",
    re.I,
)
_HEADERS = [
    re.compile(r"(Bearer\s+)\S+", re.I),
    re.compile(r"(SharedKey\s+[^:\s]+:)\S+", re.I),
]


def env_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """Literal secret values in the environment, plain and URL-encoded, longest first (so that a
    secret containing another is replaced whole)."""
    env = os.environ if env is None else env
    values = [env.get(v, "").lstrip("?") for v in SECRET_VARS]
    for part in env.get("AZURE_STORAGE_CONNECTION_STRING", "").split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() in ("accountkey", "sharedaccesssignature"):
            values.append(value)
    out = {form for v in values if len(v) >= 8 for form in (v, quote(v, safe=""))}
    return sorted(out, key=len, reverse=True)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """`text` without credentials (see the module doc); everything else stays readable."""
    for secret in env_secrets(env):
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(rf"\1{MASK}@", text)
    text = _SECRET_PARAM.sub(rf"\1{MASK}", text)
    for pat in _HEADERS:
        text = pat.sub(rf"\1{MASK}", text)
    return text


def has_secret(text: str) -> bool:
    """Does `text` hold anything `redact` would remove?"""
    return redact(text) != text
