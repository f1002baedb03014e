"""The on-disk layout of an experiment (DESIGN.md), atomic writes, and data-dir leases.

Every file armlab writes goes through `atomic_write_*` or `atomic_path` (temp name in the same
dir, fsync, rename), so a killed process never leaves a half-written file under a real name.
Training takes a lease on its arm's data dir; every writer of that dir calls `check_writable`
first (DESIGN.md invariant 5: no data moves under a live run).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError

LEASE_NAME = ".lease"
_UMASK = os.umask(0)
os.umask(_UMASK)


# -- layout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workdir:
    root: Path

    @property
    def experiment_toml(self) -> Path:
        return self.root / "experiment.toml"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokenizer_sample_dir(self) -> Path:
        """Neutral pool sample (no eval docs) that `armlab tokenizer` trains on."""
        return self.root / "tokenizer" / "sample"

    @property
    def cache_dir(self) -> Path:
        """Downloaded pool files and blobs in flight (bounded, deleted after use)."""
        return self.root / "cache"

    def arm_dir(self, arm: str) -> Path:
        return self.root / "arms" / arm

    def data_dir(self, arm: str) -> Path:
        return self.arm_dir(arm) / "data"

    def runs_dir(self, arm: str) -> Path:
        return self.arm_dir(arm) / "runs"

    def run_dir(self, arm: str, run: str) -> Path:
        return self.runs_dir(arm) / run

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def all_run_dirs(self) -> list[Path]:
        """Every run dir of every arm, sorted (arms/<arm>/runs/<run>/ holding a run.json)."""
        return sorted(p.parent for p in self.root.glob("arms/*/runs/*/run.json"))


def run_name(arm: str, seed: int) -> str:
    """Default run name: one run per arm per seed."""
    return f"{arm}-s{seed}"


def open_workdir(exp: Any, create: bool = True) -> Workdir:
    """The experiment's workdir; on create, freezes a copy of the spec as experiment.toml.

    A workdir that already holds a different experiment (another name) is refused.
    """
    root = exp.workdir_path
    wd = Workdir(root)
    if root.exists() and not root.is_dir():
        raise ArmlabError(f"{root}: the workdir is a file, not a directory; move it, or set 'workdir' in the experiment file to a directory")
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ArmlabError(f"{root}: workdir is not writable ({e.strerror}); make it writable, or set 'workdir' in the experiment file to a writable dir") from None
        frozen = wd.root / "experiment.json"
        if frozen.exists():
            old = json.loads(frozen.read_text())
            if old.get("name") != exp.name:
                raise ArmlabError(
                    f"{root}: workdir belongs to experiment {old.get('name')!r}, not {exp.name!r}; choose another workdir"
                )
        atomic_write_json(frozen, exp.model_dump(mode="json"))
        atomic_write_text(wd.experiment_toml, to_toml(exp.model_dump(mode="json", exclude_none=True)))
    return wd


def to_toml(data: dict[str, Any]) -> str:
    """Minimal TOML writer for the frozen spec (tables, arrays of tables, scalars, lists)."""

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return json.dumps(str(v))

    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            arrays.append((k, v))
        elif isinstance(v, list) and not v:
            continue
        else:
            lines.append(f"{k} = {scalar(v)}")
    for k, v in tables:
        lines.append(f"\n[{k}]")
        lines.extend(f"{kk} = {scalar(vv)}" for kk, vv in v.items())
    for k, items in arrays:
        for item in items:
            lines.append(f"\n[[{k}]]")
            lines.extend(f"{kk} = {scalar(vv)}" for kk, vv in item.items())
    return "\n".join(lines) + "\n"


# -- atomic writes --------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it into place, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep files readable like any other write
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise ArmlabError(f"{path}: unreadable JSON ({e}); delete it or rerun the step that writes it") from None


def cleanup_temp_files(directory: str | Path) -> int:
    """Remove temp files left by killed writers (`.<name>.*.tmp`); returns how many."""
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


# -- leases ---------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    """True if `pid` runs on this host. A zombie (exited, not yet reaped: common under container
    init processes that do not reap) counts as dead."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


@dataclass(frozen=True)
class Lease:
    pid: int
    host: str
    started: float
    run: str

    @property
    def local(self) -> bool:
        return self.host == socket.gethostname()

    @property
    def alive(self) -> bool:
        """Alive if the holder's pid lives on this host; a lease from another host counts as alive."""
        return pid_alive(self.pid) if self.local else True

    def describe(self) -> str:
        age = time.time() - self.started
        return f"run {self.run!r} (pid {self.pid} on {self.host}, started {age / 60:.0f} min ago)"


def read_lease(data_dir: str | Path) -> Lease | None:
    p = Path(data_dir) / LEASE_NAME
    try:
        d = json.loads(p.read_text())
        return Lease(pid=int(d["pid"]), host=str(d["host"]), started=float(d["started"]), run=str(d["run"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # A torn or foreign lease file: treat as held by an unknown live process (safe side).
        return Lease(pid=-1, host="<unreadable lease>", started=p.stat().st_mtime, run="?")


def check_writable(data_dir: str | Path, force: bool = False, action: str = "write") -> None:
    """Refuse to write into a data dir leased by a run (DESIGN.md invariant 5).

    A live holder always refuses. A dead holder (stale lease) refuses unless `force`, which then
    removes the stale lease.
    """
    lease = read_lease(data_dir)
    if lease is None:
        return
    if lease.alive:
        extra = "" if lease.local else "; it may be dead, then rerun with --force"
        if lease.local or not force:
            raise ArmlabError(f"{data_dir}: refusing to {action}: leased by live {lease.describe()}{extra}")
    elif not force:
        raise ArmlabError(
            f"{data_dir}: refusing to {action}: stale lease from dead {lease.describe()}; rerun with --force to take over"
        )
    with contextlib.suppress(FileNotFoundError):
        (Path(data_dir) / LEASE_NAME).unlink()


def acquire_lease(data_dir: str | Path, run: str, force: bool = False) -> Lease:
    """Take the data dir's lease for this process (exclusive create; stale leases need `force`)."""
    data_dir = Path(data_dir)
    check_writable(data_dir, force=force, action=f"lease it for run {run!r}")
    lease = Lease(pid=os.getpid(), host=socket.gethostname(), started=time.time(), run=run)
    body = json.dumps({"pid": lease.pid, "host": lease.host, "started": lease.started, "run": lease.run}).encode()
    try:
        fd = os.open(data_dir / LEASE_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        holder = read_lease(data_dir)
        raise ArmlabError(f"{data_dir}: already leased by {holder.describe() if holder else 'another run'}") from None
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    return lease


def release_lease(data_dir: str | Path, lease: Lease) -> None:
    """Remove the lease if it is still ours."""
    current = read_lease(data_dir)
    if current is not None and current.pid == lease.pid and current.host == lease.host:
        with contextlib.suppress(FileNotFoundError):
            (Path(data_dir) / LEASE_NAME).unlink()


@contextlib.contextmanager
def leased(data_dir: str | Path, run: str, force: bool = False) -> Iterator[Lease]:
    lease = acquire_lease(data_dir, run, force=force)
    try:
        yield lease
    finally:
        release_lease(data_dir, lease)
