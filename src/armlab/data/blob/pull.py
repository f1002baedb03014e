"""Pulling a published dir into a workdir: an arm (`pull`), or the experiment's eval set and
tokenizer (`pull_shared`).

Pulling reads the published manifest first, downloads the files it names (verified, resumable:
see `download`), checks them against it, and writes the manifest locally last. Pull refuses an arm
of another spec or eval set, and shared assets of another spec, or a different eval set or
tokenizer already in the workdir unless forced; it changes nothing while a run of the experiment
holds a lease.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.data.blob.address import MANIFEST_NAME, folder, shared_uris
from armlab.data.blob.checks import (
    _check_eval_spec,
    _check_same_spec,
    _check_tokenizer_files,
    _check_tokenizer_spec,
    _tokenizer_files,
    shard_problem,
)
from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.store import Retry, is_remote, open_store
from armlab.store.download import download_prefix, preview, read_download_record
from armlab.text import plural
from armlab.workdir import (
    atomic_write_bytes,
    check_writable,
    freeze_spec,
    open_workdir,
    read_json,
    read_leases,
    writing,
)


def _remote_manifest(uri: str, what: str, retry: Retry | None) -> tuple[bytes, dict[str, Any]]:
    """The published manifest.json under the folder `uri` (bytes, parsed); refuses a missing or
    incomplete one. `what` names the thing (e.g. "a published arm") and how to make it."""
    data = open_store(uri, retry).cat(uri + MANIFEST_NAME)
    if data is None:
        raise ArmlabError(f"{uri}: no {MANIFEST_NAME}, so this is not {what}")
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ArmlabError(f"{uri}{MANIFEST_NAME}: not an armlab manifest ({e}); publish it again") from None
    if manifest.get("complete") is not True:
        raise ArmlabError(f"{uri}{MANIFEST_NAME}: not complete; rerun `armlab publish` on the source host")
    return data, manifest


def _shard_hashes(manifest: dict[str, Any], where: str) -> dict[str, str]:
    try:
        return {f["name"]: f["sha256"] for f in manifest["files"]}
    except (KeyError, TypeError) as e:
        raise ArmlabError(
            f"{where}: not an armlab manifest (no files[].name/sha256: {e}); publish it again"
        ) from None


def _pull_dir(
    uri: str,
    dest: Path,
    manifest_bytes: bytes,
    files: list[str],
    sha256: dict[str, str] | None,
    *,
    mode: str,
    concurrency: int,
    retry: Retry | None,
    check: Callable[[Path], None] | None = None,
) -> None:
    """Download `files` of the published dir `uri` into `dest`; verify them (Content-MD5 on the way,
    then `sha256` from the manifest where given, then `check`); write manifest.json last.

    A local manifest that is not the published one is removed first, so the dir stops looking
    complete before any file changes; top-level parquet files the published dir lacks are removed.
    """
    dest.mkdir(parents=True, exist_ok=True)
    local_manifest = dest / MANIFEST_NAME
    if local_manifest.exists() and local_manifest.read_bytes() != manifest_bytes:
        local_manifest.unlink()
    for p in sorted(dest.glob("*.parquet")):  # top level only: the tokenizer dir's sample/ is not ours
        if p.name not in files and not p.name.startswith("."):
            p.unlink()
    download_prefix(uri, dest, mode=mode, concurrency=concurrency, only=files, retry=retry, check=shard_problem)
    record = read_download_record(dest)
    wrong = [n for n in files if sha256 is not None and record["files"][n]["sha256"] != sha256[n]]
    if wrong:
        for n in wrong:
            (dest / n).unlink(missing_ok=True)
        raise ArmlabError(
            f"{uri}: {plural(len(wrong), 'shard')} {'differs' if len(wrong) == 1 else 'differ'} from the published manifest's sha256 ({preview(wrong)}); "
            "deleted them: publish it again"
        )
    if check is not None:
        try:
            check(dest)
        except ArmlabError:
            for n in files:  # which file is wrong is not known: none is kept, a rerun fetches all
                (dest / n).unlink(missing_ok=True)
            raise
    atomic_write_bytes(local_manifest, manifest_bytes)


def pull(
    exp: Any,
    arm: str,
    from_uri: str | None = None,
    *,
    mode: str | None = None,
    concurrency: int | None = None,
    force: bool = False,
    retry: Retry | None = None,
) -> Path:
    """Download a published arm (see `publish`) into the arm's data dir; returns the data dir.

    Refused while a run leases the dir. The published manifest must say complete; each shard is
    verified (MD5 in transit and at rest, then sha256 against the manifest) before the manifest is
    written locally, last, so the dir only looks complete when it is. The arm must match this
    experiment's spec and, when the eval set is here, the eval set it was prepared against.
    """
    spec = exp.arm(arm)
    uri = from_uri or (spec.uri if spec.uri and is_remote(spec.uri) else None)
    if uri is None:
        raise ArmlabError(
            f"arm {arm!r} has no az:// uri (or other store URL) in the experiment file; "
            "pass --from az://<container>/<prefix>"
        )
    uri = folder(uri)
    wd = open_workdir(exp, create=False)  # created once the published arm is found and fits
    data_dir = wd.data_dir(arm)
    check_writable(data_dir, force=force, action="pull into it")

    manifest_bytes, manifest = _remote_manifest(
        uri,
        "a published arm; publish one with `armlab publish`, or use raw prebuilt shards as a "
        "kind='prebuilt' arm through `armlab prepare`",
        retry,
    )
    files = _shard_hashes(manifest, uri + MANIFEST_NAME)
    _check_same_spec(exp, spec, wd.eval_dir, manifest, uri + MANIFEST_NAME)
    freeze_spec(open_workdir(exp), exp)
    # Under the arm's lock: a run that starts now waits for the pull instead of leasing half a dir.
    with writing(data_dir, force=force, action="pull into it"):
        _pull_dir(
            uri,
            data_dir,
            manifest_bytes,
            sorted(files),
            files,
            mode=mode or spec.download_mode,
            concurrency=concurrency or spec.concurrency,
            retry=retry,
        )
    console.print(f"pulled {arm} from {uri} into {data_dir} ({plural(len(files), 'shard')}, sha256 verified)")
    return data_dir


def _refuse_if_training(exp: Any, wd: Any, force: bool, action: str) -> None:
    """No shared asset changes under a live run: every run of the experiment reads them. A lease
    from another host counts as live (as for arms) unless `force`; dead runs' leases do not count."""
    for spec in exp.arms:
        for lease in read_leases(wd.data_dir(spec.name)):
            if not lease.alive or (force and not lease.local):
                continue
            raise ArmlabError(
                f"{wd.data_dir(spec.name)}: refusing to {action}: live {lease.describe()} uses it; "
                "wait for it or stop it" + ("" if lease.local else " (if it is dead, rerun with --force)")
            )


@dataclass
class _SharedDir:
    """One shared asset to pull: where it is published, where it goes, what verifies it."""

    kind: str  # "eval set" | "tokenizer"
    uri: str  # the published folder
    dest: Path
    manifest_bytes: bytes
    manifest: dict[str, Any]
    files: list[str]
    sha256: dict[str, str] | None  # the eval manifest lists its shards' sha256; the tokenizer's does not
    check: Callable[[Path], None] | None = None

    def same_as(self, here: dict[str, Any]) -> bool:
        """Is the complete local manifest `here` the same asset? By content, not by when or where
        it was made: the same shards for an eval set, the same fingerprint for a tokenizer."""
        if self.sha256 is not None:
            return _shard_hashes(here, str(self.dest)) == self.sha256
        return here.get("fingerprint") == self.manifest.get("fingerprint")


def pull_shared(
    exp: Any,
    from_uri: str,
    *,
    mode: str = "bulk",
    concurrency: int = 8,
    force: bool = False,
    retry: Retry | None = None,
) -> dict[str, Path]:
    """Download the eval set and tokenizer published by `publish_shared` into this workdir.

    Both published manifests must be complete and of this experiment's spec. An eval set or
    tokenizer already here is kept when it is the same one (same shard sha256s / tokenizer
    fingerprint) and refused when it differs, unless `force` replaces it (runs trained with the
    old one no longer compare). Nothing changes while a run of the experiment is live. Files are
    verified (Content-MD5, eval shards' sha256, the tokenizer's fingerprint) and each dir's
    manifest is written last. Returns {"eval": eval dir, "tokenizer": tokenizer dir}.
    """
    uris = shared_uris(from_uri)
    wd = open_workdir(exp, create=False)  # created once both published dirs are found and fit
    how = f"run `armlab publish EXP --shared --to {from_uri}` on the host that prepared the experiment"
    ev_uri, tok_uri = uris["eval"], uris["tokenizer"]
    ev_bytes, ev_manifest = _remote_manifest(ev_uri, f"a published eval set; {how}", retry)
    tok_bytes, tok_manifest = _remote_manifest(tok_uri, f"a published tokenizer; {how}", retry)
    ev_files = _shard_hashes(ev_manifest, ev_uri + MANIFEST_NAME)
    _check_eval_spec(exp, ev_manifest, ev_uri + MANIFEST_NAME)
    _check_tokenizer_spec(exp, tok_manifest, tok_uri + MANIFEST_NAME)
    assets = [
        _SharedDir("eval set", ev_uri, wd.eval_dir, ev_bytes, ev_manifest, sorted(ev_files), ev_files),
        _SharedDir(
            "tokenizer",
            tok_uri,
            wd.tokenizer_dir,
            tok_bytes,
            tok_manifest,
            _tokenizer_files(),
            None,
            lambda d: _check_tokenizer_files(d, tok_manifest),
        ),
    ]

    todo = []
    for a in assets:
        path = a.dest / MANIFEST_NAME
        here = read_json(path) if path.is_file() else None
        if here is None or here.get("complete") is not True:
            todo.append(a)  # nothing here yet, or an interrupted pull: download (resumes)
        elif a.same_as(here):
            console.print(
                f"{a.dest}: already holds the published {a.kind} ({a.uri}); nothing to pull",
                soft_wrap=True,
            )
        elif force:
            todo.append(a)
        else:
            raise ArmlabError(
                f"{a.dest}: holds a different {a.kind} than {a.uri}; runs trained with one do not compare "
                "with runs trained with the other: pull into a fresh workdir, or pass --force to replace it"
            )
    if todo:
        _refuse_if_training(exp, wd, force, f"write the experiment's {' and '.join(a.kind for a in todo)}")
        freeze_spec(open_workdir(exp), exp)
    for a in todo:
        _pull_dir(
            a.uri,
            a.dest,
            a.manifest_bytes,
            a.files,
            a.sha256,
            mode=mode,
            concurrency=concurrency,
            retry=retry,
            check=a.check,
        )
        console.print(
            f"pulled the {a.kind} from {a.uri} into {a.dest} ({plural(len(a.files), 'file')}, verified)",
            soft_wrap=True,
        )
    return {"eval": wd.eval_dir, "tokenizer": wd.tokenizer_dir}
