"""Addresses in Azure Blob Storage: `az://container/prefix` uris (`AzPath`, `parse_az_uri`),
blob names mapped safely to local paths, and where published dirs go: each holds its files plus
`manifest.json`; an experiment's shared assets sit under `<root>/_shared/`, its arms beside them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from armlab.errors import ArmlabError

MANIFEST_NAME = "manifest.json"
# Azure's container naming rule: 3-63 chars, lowercase letters, digits and single hyphens.
CONTAINER_RE = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


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


def _rel_name(az: AzPath, name: str) -> str:
    """A blob's path under the local dir; refuses names that would escape it."""
    rel = name[len(az.prefix) :]
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ArmlabError(
            f"{az.uri(rel)}: blob name cannot be mapped to a local file safely; rename the blob"
        )
    return rel


def _preview(names: Iterable[str], n: int = 3) -> str:
    names = list(names)
    head = ", ".join(names[:n])
    return head + (f" and {len(names) - n} more" if len(names) > n else "")


SHARED_DIR = "_shared"  # under an experiment prefix; arm names start with a letter or digit, never "_"


def shared_uris(root_uri: str) -> dict[str, str]:
    """Where `publish --shared` puts an experiment's shared assets under `root_uri`."""
    root = parse_az_uri(root_uri)
    return {
        "eval": root.uri(f"{SHARED_DIR}/eval/"),
        "tokenizer": root.uri(f"{SHARED_DIR}/tokenizer/"),
    }


def arm_uri(root_uri: str, arm: str) -> str:
    """Where an arm goes when published together with the shared assets: `<root>/<arm>/`."""
    return parse_az_uri(root_uri).uri(f"{arm}/")
