"""Where published dirs go: each holds its files plus `manifest.json`; an experiment's shared
assets sit under `<root>/_shared/`, its arms beside them. Any store URL works (`az://container/
prefix` is the usual one); a URL names a folder, so `az://c/top16` is `az://c/top16/`.
"""

from __future__ import annotations

from armlab.errors import ArmlabError
from armlab.store import is_remote
from armlab.store.redact import redact

MANIFEST_NAME = "manifest.json"
SHARED_DIR = "_shared"  # under an experiment prefix; arm names start with a letter or digit, never "_"


def folder(uri: str) -> str:
    """`uri` as a folder URL (ending in "/"); one line when it is not a store URL."""
    if not is_remote(uri):
        raise ArmlabError(
            f"{redact(uri)!r}: not a store URL; expected az://<container>/<prefix> (or another store's URL)"
        )
    if uri.startswith("az://"):
        from armlab.store.azure import parse_az_uri

        return parse_az_uri(uri).uri()  # checks the container name
    return uri.rstrip("/") + "/"


def shared_uris(root_uri: str) -> dict[str, str]:
    """Where `publish --shared` puts an experiment's shared assets under `root_uri`."""
    root = folder(root_uri)
    return {"eval": f"{root}{SHARED_DIR}/eval/", "tokenizer": f"{root}{SHARED_DIR}/tokenizer/"}


def arm_uri(root_uri: str, arm: str) -> str:
    """Where an arm goes when published together with the shared assets: `<root>/<arm>/`."""
    return f"{folder(root_uri)}{arm}/"
