"""CORE eval bundles: DCLM's format (core.yaml, eval_data/*.jsonl, eval_meta_data.csv).

A bundle is a local dir or a URL (a .zip of such a dir, on any store armlab reads: https://,
file://, az://, hf://). The default is DCLM's bundle at the URL nanochat's `scripts/base_eval.py`
downloads it from (`spec.DCLM_EVAL_BUNDLE_URL`). A URL is downloaded once into a shared cache
under a file lock (several ranks or runs may ask at once) through the storage seam
(`armlab.store.download.download_file`: retried per ARMLAB_NET_ATTEMPTS, each request bounded by
ARMLAB_NET_TIMEOUT, resumed after a dropped connection, secrets redacted), checked against a
sha256 when the experiment gives one, unpacked to a temp dir that is renamed into place (a killed
download never leaves a half-bundle behind a real name), and its sha256 is recorded and checked
on every later use (`fetch_bundle`).

Every problem names the file at fault: a missing core.yaml, a task without `dataset_uri`, a task
with no random baseline in eval_meta_data.csv, a malformed jsonl line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from armlab.errors import ArmlabError
from armlab.store import is_remote, redact

RECORD = ".armlab-bundle.json"  # what a downloaded bundle was: source, archive and content sha256

# What to do when the bundle cannot be fetched (offline, a firewall): said by the download error
# and by `armlab doctor`. EXP is replaced by the experiment path the user typed (cli.app).
OFFLINE_FIX = (
    'to train without CORE, set core_bundle = "none" under [evaluate] in EXP (val bpb only) or pass '
    "--bundle none; or point --bundle at a local copy of the bundle dir"
)
PROBE_TIMEOUT_S = 10.0  # the most `doctor` / `init` wait for the bundle URL to answer a request

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# Fields each task type's items must carry (nanochat's core_eval reads exactly these).
ITEM_FIELDS = {
    "multiple_choice": ("query", "choices", "gold"),
    "schema": ("context_options", "continuation", "gold"),
    "language_modeling": ("context", "continuation"),
}


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str
    dataset_uri: str
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # percent, as in eval_meta_data.csv


@dataclass(frozen=True)
class Bundle:
    root: Path
    tasks: list[Task]
    source: str  # the path or URL it came from
    sha256: str  # of core.yaml + eval_meta_data.csv + every task file, in task order
    demo: bool = False  # armlab demo's own tasks (not DCLM's CORE); the report labels them
    name: str = "core"
    archive_sha256: str | None = None  # of the zip it was downloaded as (URL sources)
    extra: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "archive_sha256": self.archive_sha256,
            "name": self.name,
            "demo": self.demo,
            "tasks": [t.label for t in self.tasks],
        }

    def load_items(self, task: Task) -> list[dict[str, Any]]:
        """The task's items, validated: every line JSON with the fields its task type needs."""
        path = self.root / "eval_data" / task.dataset_uri
        if not path.is_file():
            raise ArmlabError(f"{path}: task {task.label!r} data file missing from the eval bundle")
        items: list[dict[str, Any]] = []
        need = ITEM_FIELDS[task.task_type]
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as e:
                    raise ArmlabError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                missing = [k for k in need if k not in item] if isinstance(item, dict) else list(need)
                if missing:
                    raise ArmlabError(
                        f"{path}:{lineno}: {task.task_type} item lacks {', '.join(missing)} (task {task.label!r})"
                    )
                items.append(item)
        if not items:
            raise ArmlabError(f"{path}: task {task.label!r} has no items")
        return items


def cache_root() -> Path:
    """Where downloaded bundles live (shared by experiments): $ARMLAB_CACHE or ~/.cache/armlab."""
    return Path(os.environ.get("ARMLAB_CACHE", "~/.cache/armlab")).expanduser() / "bundles"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Download:
    """A bundle fetched from a URL, as recorded in the cache when it was first downloaded."""

    root: Path  # the unpacked bundle
    source: str  # the URL, without secrets
    archive_sha256: str  # of the zip as downloaded
    content_sha256: str  # of the unpacked files, to notice later edits
    downloaded: float


def tree_sha256(root: Path) -> str:
    """sha256 over every file under `root` (relative path and bytes, sorted), the record file excepted."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file() and q.name != RECORD):
        h.update(str(p.relative_to(root)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _download(url: str, archive: Path, safe: str) -> None:
    """The URL's zip into `archive` through the storage seam (verified, resumable, retried; reused
    while the server lists the same version), its failure one line that offers the way round."""
    from armlab.store import Retry
    from armlab.store.download import download_file

    try:
        download_file(url, archive, Retry.from_env())  # ARMLAB_NET_* as they are now
    except ArmlabError as e:
        raise ArmlabError(f"{safe}: cannot download the eval bundle ({_why(str(e))}); {OFFLINE_FIX}") from None


def _why(line: str, advice: bool = True) -> str:
    """The store's one line without the (redacted) URL it starts with (the caller names it), and
    without its advice ("; check the network, then rerun ...") when the caller gives its own."""
    line = re.sub(r"^\S+://\S*: ", "", line)
    return line if advice else re.sub(r"; check .*$", "", line)


def probe(url: str) -> str | None:
    """Whether the bundle URL answers now, without downloading it: None if it does, else why not
    ("unreachable (...)"). The storage seam's probe (one attempt; each request bounded by
    ARMLAB_NET_TIMEOUT, at most PROBE_TIMEOUT_S: `init` and `doctor` must not hang on a firewall),
    so what it reaches the download can."""
    from armlab.store import probe as store_probe

    problem = store_probe(url, PROBE_TIMEOUT_S)
    return None if problem is None else f"unreachable ({_why(problem, advice=False)})"


def _cache_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def cached(url: str) -> Path | None:
    """The unpacked bundle of `url` in the shared cache, if it was downloaded (nothing fetched)."""
    dest = cache_root() / _cache_key(url)
    return dest if (dest / RECORD).is_file() else None


def fetch_bundle(url: str, sha256: str | None = None) -> Download:
    """Download a zipped bundle once into the shared cache and unpack it; return its record.

    Under a file lock (ranks and runs may ask at once; the first downloads, the others wait), the
    zip is downloaded through the storage seam into `<key>.download/` (a `.part` file renamed once
    complete and verified, reused while the server lists the same version), checked against `sha256` when the experiment gives one,
    unpacked into a temp dir renamed into place, and recorded (`.armlab-bundle.json`: source,
    archive and content sha256). Every later call checks the unpacked files against that record
    (and `sha256` against the recorded archive), so an edited or swapped cache never scores
    silently. nanochat downloads the same zip with `download_file_with_lock` (no checksum).
    """
    key = _cache_key(url)
    safe = redact(url)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    dest = root / key
    downloads = root / f"{key}.download"  # the zip and the seam's download record, one dir a URL
    with FileLock(str(root / f"{key}.lock")):
        if not (dest / RECORD).is_file():
            archive = downloads / "bundle.zip"
            _download(url, archive, safe)
            got = sha256_file(archive)
            if sha256 and got != sha256:
                archive.unlink()
                raise ArmlabError(
                    f"{safe}: eval bundle sha256 is {got}, expected {sha256} (evaluate.core_bundle_sha256)"
                )
            if dest.exists():
                shutil.rmtree(dest)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(tmp_dir)
            except zipfile.BadZipFile:
                shutil.rmtree(tmp_dir)
                archive.unlink()
                raise ArmlabError(
                    f"{safe}: not a zip file; an eval bundle URL must point to a .zip of the bundle dir"
                ) from None
            record = {
                "source": safe,
                "archive_sha256": got,
                "content_sha256": tree_sha256(tmp_dir),
                "downloaded": time.time(),
            }
            (tmp_dir / RECORD).write_text(json.dumps(record, indent=1) + "\n")
            os.replace(tmp_dir, dest)
        record = json.loads((dest / RECORD).read_text())
    fix = f"delete {dest} (and {downloads}) to download it again"
    if sha256 and record["archive_sha256"] != sha256:
        raise ArmlabError(
            f"{dest}: cached eval bundle has sha256 {record['archive_sha256']}, the experiment expects {sha256}; {fix}"
        )
    if tree_sha256(dest) != record["content_sha256"]:
        raise ArmlabError(
            f"{dest}: cached eval bundle was modified since it was downloaded from {safe}; {fix}"
        )
    return Download(dest, safe, record["archive_sha256"], record["content_sha256"], record["downloaded"])


def bundle_dir(root: Path) -> Path:
    """The dir holding core.yaml: the root itself or its single subdir (zip files wrap one)."""
    if (root / "core.yaml").is_file():
        return root
    subs = [p for p in root.iterdir() if p.is_dir() and (p / "core.yaml").is_file()] if root.is_dir() else []
    return subs[0] if len(subs) == 1 else root


def _baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise ArmlabError(f"{path}: eval bundle has no eval_meta_data.csv (random baselines per task)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        for col in ("Eval Task", "Random baseline"):
            if col not in cols:
                raise ArmlabError(f"{path}: missing column {col!r} (columns: {', '.join(cols) or 'none'})")
        out: dict[str, float] = {}
        for lineno, row in enumerate(reader, 2):
            try:
                out[row["Eval Task"].strip()] = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise ArmlabError(
                    f"{path}:{lineno}: 'Random baseline' {row['Random baseline']!r} is not a number"
                ) from None
    return out


def load_bundle(source: str | Path, sha256: str | None = None) -> Bundle:
    """Open a bundle from a local dir or a URL; validates core.yaml and the baselines up front."""
    source = str(source)
    download = fetch_bundle(source, sha256) if is_remote(source) else None
    root = download.root if download else Path(source).expanduser()
    if not root.exists():
        raise ArmlabError(f"{root}: eval bundle dir not found (set evaluate.core_bundle or pass --bundle)")
    root = bundle_dir(root)
    config_path = root / "core.yaml"
    if not config_path.is_file():
        raise ArmlabError(f"{config_path}: eval bundle has no core.yaml")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ArmlabError(f"{config_path}: invalid YAML ({str(e).splitlines()[0]})") from None
    raw_tasks = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ArmlabError(f"{config_path}: needs a non-empty 'icl_tasks' list")
    meta_path = root / "eval_meta_data.csv"
    baselines = _baselines(meta_path)
    tasks: list[Task] = []
    for i, t in enumerate(raw_tasks):
        where = f"{config_path}: icl_tasks[{i}]"
        if not isinstance(t, dict):
            raise ArmlabError(f"{where}: must be a mapping")
        for k in ("label", "dataset_uri", "icl_task_type", "num_fewshot"):
            if k not in t:
                raise ArmlabError(f"{where}: missing key {k!r}")
        label = str(t["label"])
        if t["icl_task_type"] not in TASK_TYPES:
            raise ArmlabError(
                f"{where}: icl_task_type {t['icl_task_type']!r} is not one of {', '.join(TASK_TYPES)}"
            )
        shots = t["num_fewshot"]
        shots = shots[0] if isinstance(shots, list) and shots else shots  # DCLM writes [10]
        if not isinstance(shots, int) or shots < 0:
            raise ArmlabError(
                f"{where}: num_fewshot must be a non-negative integer or [n], got {t['num_fewshot']!r}"
            )
        if label not in baselines:
            raise ArmlabError(
                f"{meta_path}: no 'Random baseline' row for task {label!r} (named in core.yaml)"
            )
        tasks.append(
            Task(
                label=label,
                task_type=t["icl_task_type"],
                dataset_uri=str(t["dataset_uri"]),
                num_fewshot=shots,
                continuation_delimiter=str(t.get("continuation_delimiter", " ")),
                random_baseline=baselines[label],
            )
        )
        if not (root / "eval_data" / tasks[-1].dataset_uri).is_file():
            raise ArmlabError(
                f"{root / 'eval_data' / tasks[-1].dataset_uri}: data file of task {label!r} is missing"
            )
    h = hashlib.sha256()
    for p in [config_path, meta_path] + [root / "eval_data" / t.dataset_uri for t in tasks]:
        h.update(sha256_file(p).encode())
    return Bundle(
        root=root,
        tasks=tasks,
        source=redact(source) if is_remote(source) else source,
        sha256=h.hexdigest()[:16],
        demo=bool(config.get("armlab_demo", False)),
        name=str(config.get("name", "core")),
        archive_sha256=download.archive_sha256 if download else None,
    )


def write_bundle(root: Path, tasks: list[dict[str, Any]], name: str = "core", demo: bool = False) -> Path:
    """Write a bundle in DCLM's format. Each task: {label, icl_task_type, num_fewshot,
    continuation_delimiter, random_baseline (percent), description, items: [...]}.

    Written into a temp dir and renamed, so a reader never sees a partial bundle.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "eval_data").mkdir()
        config = {"name": name, "armlab_demo": demo, "icl_tasks": []}
        rows = []
        for t in tasks:
            uri = f"{t['label']}.jsonl"
            with open(tmp / "eval_data" / uri, "w", encoding="utf-8") as f:
                for item in t["items"]:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
            config["icl_tasks"].append(
                {
                    "label": t["label"],
                    "dataset_uri": uri,
                    "num_fewshot": [t["num_fewshot"]],
                    "icl_task_type": t["icl_task_type"],
                    "continuation_delimiter": t.get("continuation_delimiter", " "),
                }
            )
            rows.append(
                {
                    "Eval Task": t["label"],
                    "Task Category": t.get("category", "demo"),
                    "Task Type": t["icl_task_type"],
                    "#shots": t["num_fewshot"],
                    "#datapoints": len(t["items"]),
                    "Random baseline": t["random_baseline"],
                    "Centered Metric?": "Yes",
                    "Description": t.get("description", ""),
                }
            )
        (tmp / "core.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        with open(tmp / "eval_meta_data.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
