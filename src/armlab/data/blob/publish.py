"""Publishing a dir to a store (Azure Blob Storage, or any writable store): an arm (`publish`), or
the experiment's eval set and tokenizer (`publish_shared`).

Publishing uploads a dir's files with Content-MD5 set and its manifest.json last, so a reader never
sees a manifest whose files are not all there; files already present with the same size and MD5 are
skipped, which makes an interrupted publish resumable. Every file is checked against its manifest
before anything is uploaded (never publish a modified file).
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.data.blob.address import MANIFEST_NAME, folder, shared_uris
from armlab.data.blob.checks import _check_tokenizer_files, _check_tokenizer_spec, _tokenizer_files
from armlab.errors import ArmlabError
from armlab.progress import byte_counter, console, progress
from armlab.store import Retry, open_store
from armlab.store.download import hash_file, preview
from armlab.text import plural
from armlab.workdir import open_workdir, read_json

PARQUET_TYPE = "application/vnd.apache.parquet"


def _complete_manifest(directory: Path, fix: str) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise ArmlabError(f"{directory}: no {MANIFEST_NAME}; {fix}")
    manifest = read_json(path)
    if manifest.get("complete") is not True:
        raise ArmlabError(f"{path}: not complete (interrupted?); {fix}")
    return manifest


def _local_state(
    label: str, directory: Path, files: list[str], sha256: dict[str, str] | None, fix: str, concurrency: int
) -> dict[str, tuple[int, str]]:
    """(size, md5) of each file and of manifest.json, after checking that every file is there and,
    where `sha256` lists it, is the one the manifest names (never publish a modified file)."""
    missing = [n for n in files if not (directory / n).is_file()]
    if missing:
        raise ArmlabError(
            f"{directory}: {plural(len(missing), 'file')} of {MANIFEST_NAME} missing ({preview(missing)}); {fix}"
        )
    local: dict[str, tuple[int, str]] = {}
    with progress() as prog, ThreadPoolExecutor(max_workers=concurrency) as ex:
        task = prog.add_task(f"verify {label}", total=len(files), unit="files", bytes=0)
        nbytes = 0
        for name, (md5, sha) in zip(files, ex.map(lambda n: hash_file(directory / n), files), strict=True):
            if sha256 is not None and sha != sha256[name]:
                raise ArmlabError(
                    f"{directory / name}: sha256 differs from {MANIFEST_NAME} (modified after it was written?); {fix}"
                )
            size = (directory / name).stat().st_size
            local[name] = (size, md5)
            nbytes += size
            prog.update(task, advance=1, bytes=nbytes)
    manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
    local[MANIFEST_NAME] = (len(manifest_bytes), hashlib.md5(manifest_bytes).hexdigest())
    return local


@dataclass
class PublishReport:
    uri: str
    files: int
    uploaded: int
    skipped: int
    bytes_uploaded: int
    seconds: float


def _upload_dir(
    kind: str,
    label: str,
    directory: Path,
    files: list[str],
    local: dict[str, tuple[int, str]],
    uri: str,
    *,
    concurrency: int,
    replace: bool,
    retry: Retry | None,
) -> PublishReport:
    """Upload `files` of `directory` to the folder `uri` (Content-MD5 set), then its manifest.json last.

    `kind` ("arm", "eval set", "tokenizer") and `label` name it in messages; `local` is
    `_local_state`'s (size, md5) per file. Files already there with the same size and MD5 are
    skipped (an interrupted publish resumes). Files under the prefix that are not this dir's are
    refused unless `replace`, which deletes them.
    """
    t0 = time.time()
    prefix = folder(uri)
    manifest_bytes = (directory / MANIFEST_NAME).read_bytes()
    if (len(manifest_bytes), hashlib.md5(manifest_bytes).hexdigest()) != local[MANIFEST_NAME]:
        raise ArmlabError(f"{directory / MANIFEST_NAME}: changed while publishing; rerun")
    store = open_store(prefix, retry)
    remote = {e.url.removeprefix(prefix): (e.size, e.md5) for e in store.list(prefix)}
    others = sorted(set(remote) - set(local))
    if others and not replace:
        raise ArmlabError(
            f"{prefix}: the prefix already holds {plural(len(others), 'blob')} that {'is' if len(others) == 1 else 'are'} not this {kind}'s "
            f"({preview(others)}); choose an empty prefix, or pass --replace to delete them"
        )
    todo = [n for n in files if remote.get(n) != local[n]]
    manifest_current = remote.get(MANIFEST_NAME) == local[MANIFEST_NAME]
    if todo or others or not manifest_current:
        # The manifest goes first and comes back last: a reader never sees it with files changing.
        for name in ([MANIFEST_NAME] if MANIFEST_NAME in remote else []) + others:
            store.delete(prefix + name)
        per_file = max(1, concurrency // max(1, min(concurrency, len(todo))))
        abort = threading.Event()
        with progress() as prog, ThreadPoolExecutor(max_workers=min(concurrency, max(1, len(todo)))) as ex:
            task = prog.add_task(
                f"publish {label}", total=len(files), completed=len(files) - len(todo), unit="files", bytes=0
            )
            on_bytes = byte_counter(prog, task)

            def upload(name: str) -> None:
                store.put(
                    str(directory / name), prefix + name, local[name][1], _content_type(name), on_bytes, per_file, abort
                )

            try:
                for fut in as_completed([ex.submit(upload, n) for n in todo]):
                    fut.result()
                    prog.advance(task)
            except BaseException:
                abort.set()
                raise
        store.put(str(directory / MANIFEST_NAME), prefix + MANIFEST_NAME, local[MANIFEST_NAME][1], _content_type(MANIFEST_NAME))
    report = PublishReport(
        prefix,
        len(files),
        len(todo),
        len(files) - len(todo),
        sum(local[n][0] for n in todo),
        time.time() - t0,
    )
    console.print(
        f"published {label} to {prefix}: {plural(report.files, 'file')}, {report.uploaded} uploaded, "
        f"{report.skipped} already there" + (f", {plural(len(others), 'other blob')} deleted" if others else "")
    )
    return report


def _content_type(name: str) -> str:
    if name.endswith(".parquet"):
        return PARQUET_TYPE
    return "application/json" if name.endswith(".json") else "application/octet-stream"


def publish(
    exp: Any,
    arm: str,
    to_uri: str,
    *,
    concurrency: int = 8,
    replace: bool = False,
    retry: Retry | None = None,
) -> PublishReport:
    """Upload arm `arm`'s shards and manifest.json to `to_uri` (manifest last, Content-MD5 set).

    Shards are checked against the manifest's sha256 first (never publish a modified shard).
    Blobs already there with the same size and MD5 are skipped (an interrupted publish resumes).
    Blobs under the prefix that are not this arm's are refused unless `replace`, which deletes them.
    """
    exp.arm(arm)
    to_uri = folder(to_uri)
    data_dir = open_workdir(exp, create=False).data_dir(arm)
    fix = f"run `armlab prepare` for arm {arm!r} before publishing it"
    manifest = _complete_manifest(data_dir, fix)
    files = [f["name"] for f in manifest["files"]]
    local = _local_state(
        arm, data_dir, files, {f["name"]: f["sha256"] for f in manifest["files"]}, fix, concurrency
    )
    return _upload_dir(
        "arm",
        arm,
        data_dir,
        files,
        local,
        to_uri,
        concurrency=concurrency,
        replace=replace,
        retry=retry,
    )


def publish_shared(
    exp: Any,
    to_uri: str,
    *,
    concurrency: int = 8,
    replace: bool = False,
    retry: Retry | None = None,
) -> list[PublishReport]:
    """Upload the experiment's eval set and tokenizer under `<to_uri>/_shared/` (see `shared_uris`).

    Both are checked before anything is uploaded: complete manifests, eval shards matching their
    sha256, a tokenizer of this experiment whose files match its fingerprint. Then each dir is
    uploaded like an arm (Content-MD5 set, manifest last, resumable).
    """
    uris = shared_uris(to_uri)
    wd = open_workdir(exp, create=False)
    ev_fix = "run `armlab prepare EXP` first"
    ev_manifest = _complete_manifest(wd.eval_dir, ev_fix)
    ev_files = [f["name"] for f in ev_manifest["files"]]
    tok_fix = "run `armlab tokenizer EXP` first"
    tok_manifest = _complete_manifest(wd.tokenizer_dir, tok_fix)
    _check_tokenizer_spec(exp, tok_manifest, str(wd.tokenizer_dir))
    _check_tokenizer_files(wd.tokenizer_dir, tok_manifest)
    ev_local = _local_state(
        "eval set",
        wd.eval_dir,
        ev_files,
        {f["name"]: f["sha256"] for f in ev_manifest["files"]},
        ev_fix,
        concurrency,
    )
    tok_local = _local_state("tokenizer", wd.tokenizer_dir, _tokenizer_files(), None, tok_fix, concurrency)
    opts: dict[str, Any] = {"concurrency": concurrency, "replace": replace, "retry": retry}
    return [
        _upload_dir(
            "eval set", "eval set", wd.eval_dir, ev_files, ev_local, uris["eval"], **opts
        ),
        _upload_dir(
            "tokenizer",
            "tokenizer",
            wd.tokenizer_dir,
            _tokenizer_files(),
            tok_local,
            uris["tokenizer"],
            **opts,
        ),
    ]
