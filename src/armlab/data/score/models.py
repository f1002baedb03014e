"""Where a scorer's model comes from, and what it is: a local file or dir, an http(s) URL, or a
Hugging Face hub id; its content hash.

- A local path (file, or a dir saved with `save_pretrained`) is used in place.
- An http(s) URL (a fastText .bin, a head's .safetensors / .npz; `$VARS` in it are expanded from
  the environment when it is fetched, so a signed URL's token need not be in the experiment
  file, nor in the frozen copy of it in the workdir) is downloaded into
  `$ARMLAB_CACHE/models/url/` (default ~/.cache/armlab) by the storage seam's `download_file`
  (verified, resumable, reused while the server lists the same version; a new version is
  downloaded again, and `score` then sees another model), under a file lock (the workers of
  one host may ask at once).
- A hub id (`org/name`, kind "hf") goes through huggingface_hub's `snapshot_download` with the
  scorer's `revision` into the hub's own cache (HF_HOME / HF_HUB_CACHE; HF_TOKEN and HF_ENDPOINT
  from the environment, read by huggingface_hub itself, never logged). Only the files a sequence
  classifier needs are fetched (config, tokenizer, safetensors weights).

`ref` is what the scorer's identity records: a local model's content hash (moving the file
keeps its scores), a URL without credentials, or `hub:<id>@<revision>`. `resolve` gives the
local path and the content sha256 of what was actually loaded; workers resolve on their own host
(a Ray node downloads into its own cache) and check that hash against the parent's.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from armlab.data.shards import sha256_file
from armlab.errors import ArmlabError
from armlab.spec import ScorerSpec
from armlab.store.redact import redact
from armlab.workdir import atomic_write_json, read_json

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a sequence classifier needs from a hub repo (not its ONNX / TF / duplicate .bin weights).
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
# What a model dir's content hash covers: the files a model loads from (not its README, say)
MODEL_FILES = (*HUB_FILES, "*.bin")


def cache_root() -> Path:
    """Downloaded models: $ARMLAB_CACHE/models (default ~/.cache/armlab/models)."""
    return Path(os.environ.get("ARMLAB_CACHE", "~/.cache/armlab")).expanduser() / "models"


def shown(url: str) -> str:
    """A URL as armlab shows it: no userinfo, tokens, query or fragment (signed URLs carry secrets there)."""
    u = urllib.parse.urlsplit(redact(url))
    return u._replace(query="", fragment="").geturl()


def source_of(s: ScorerSpec) -> str:
    """ "url", "local" or "hub" (a path that exists wins over a hub id of the same spelling)."""
    if urllib.parse.urlsplit(s.model).scheme in ("http", "https"):
        return "url"
    if local_path(s).exists() or s.kind != "hf" or not HUB_ID.match(s.model):
        return "local"
    return "hub"


def local_path(s: ScorerSpec) -> Path:
    return Path(os.path.expandvars(s.model)).expanduser()


def ref(s: ScorerSpec) -> str:
    """What the scorer's identity records about its model (see the module doc)."""
    src = source_of(s)
    if src == "url":
        return shown(s.model)
    if src == "hub":
        return f"hub:{s.model}@{s.revision or 'main'}"
    return f"sha256:{content_sha256(_existing(s))}"


@dataclass(frozen=True)
class Resolved:
    path: Path  # the model file, or the dir holding it
    sha256: str  # of its content (a dir: every file, by relative path)
    source: str  # how it is shown: the path, the URL without secrets, or hub:<id>@<commit>


def resolve(s: ScorerSpec) -> Resolved:
    """Download (once) or find the model; its local path and content hash."""
    src = source_of(s)
    if src == "url":  # $VARS expanded only here: a signed URL's token stays in the environment
        path = fetch_url(os.path.expandvars(s.model), f"scorer {s.name!r}")
        return Resolved(path, content_sha256(path), shown(s.model))
    if src == "hub":
        path = fetch_hub(s)
        return Resolved(path, content_sha256(path), f"hub:{s.model}@{path.name}")
    path = _existing(s)
    return Resolved(path, content_sha256(path), str(path))


def _existing(s: ScorerSpec) -> Path:
    p = local_path(s)
    if not p.exists():
        hub = " (or a hub id org/name)" if s.kind == "hf" else ""
        raise ArmlabError(
            f"scorer {s.name!r}: model {s.model!r} not found; set model to a file, dir{hub} or http(s) URL"
        )
    return p


# -- content hashes --------------------------------------------------------------------------------
def content_sha256(path: Path) -> str:
    """sha256 of a file, or of a dir's model files (MODEL_FILES: relative path and each file's
    sha256, sorted; the same for a hub snapshot and a copy of the repo on disk). Cached by
    (path, size, mtime) in the models cache: a 1 GB fastText model is hashed once."""
    if path.is_file():
        return _file_sha256(path)
    h = hashlib.sha256()
    files = [q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")]
    for p in sorted(q for q in files if any(fnmatch.fnmatch(q.name, m) for m in MODEL_FILES)):
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + _file_sha256(p).encode() + b"\n")
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    real = path.resolve()  # hub snapshots are symlinks into the blob store
    st = real.stat()
    record = cache_root() / "hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:24]}.json"
    key = [str(real), st.st_size, st.st_mtime_ns]
    try:
        cached = read_json(record)
        if cached.get("key") == key:
            return str(cached["sha256"])
    except (FileNotFoundError, ValueError):
        pass
    digest = sha256_file(real)
    with contextlib.suppress(OSError):  # a read-only cache only costs the hash again
        atomic_write_json(record, {"key": key, "sha256": digest})
    return digest


# -- downloads -------------------------------------------------------------------------------------
def fetch_url(url: str, who: str) -> Path:
    """The URL's file in the models cache: `store.download.download_file` (verified, resumable,
    reused while the server lists the same version), one process per file at a time."""
    from filelock import FileLock

    from armlab.store.download import download_file

    safe = shown(url)
    key = hashlib.sha256(safe.encode()).hexdigest()[:16]
    name = Path(urllib.parse.urlsplit(safe).path).name
    name = "model" if name in ("", ".", "..") else name  # a URL ending in `/..` names no file here
    dest = cache_root() / "url" / key / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest.parent / ".lock")):
        try:
            return download_file(url, dest)
        except ArmlabError as e:
            raise ArmlabError(f"{who}: cannot download its model: {redact(str(e))}") from None


def fetch_hub(s: ScorerSpec) -> Path:
    """`snapshot_download` of the scorer's hub model at its revision (the hub's own cache)."""
    import tqdm
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Its bars stay, without tqdm's monitor thread: `score` forks its workers next, and a process
    # that runs a thread gets a slower forkserver (executor.LocalExecutor).
    tqdm.tqdm.monitor_interval = 0
    what = f"scorer {s.name!r}: hub model {s.model!r}" + (f" (revision {s.revision!r})" if s.revision else "")
    try:
        return Path(snapshot_download(s.model, revision=s.revision, allow_patterns=HUB_FILES))
    except RevisionNotFoundError:
        raise ArmlabError(
            f"{what}: no such revision; set revision to a branch, tag or commit of the repo"
        ) from None
    except RepositoryNotFoundError:
        raise ArmlabError(
            f"{what}: not found (or private: set HF_TOKEN); check the id, or set model to a local dir"
        ) from None
    except (LocalEntryNotFoundError, EntryNotFoundError) as e:
        raise ArmlabError(f"{what}: not downloadable and not in the hub cache ({_first_line(e)})") from None
    except (HfHubHTTPError, OSError) as e:
        raise ArmlabError(f"{what}: download failed ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return redact((str(e).splitlines() or [type(e).__name__])[0])[:200]


def describe(s: ScorerSpec, resolved: Resolved) -> dict[str, str]:
    """What a scores manifest records about the model."""
    return {"source": resolved.source, "sha256": resolved.sha256, "ref": ref(s)}
