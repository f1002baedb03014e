"""The on-disk layout of an experiment (DESIGN.md), atomic writes, step locks and data leases.

Every file armlab writes goes through `atomic_write_*` or `atomic_path` (temp name in the same
dir, fsync, rename), so a killed process never leaves a half-written file under a real name.

Two armlab processes on one workdir never corrupt it (DESIGN.md invariant 5: no data moves
under a live run):

- **Step locks** (`step_lock`): one OS file lock (flock, via filelock) per experiment step
  (`prepare`, `tokenizer`, `export`) in `<workdir>/locks/`. A second process waits for it, or
  refuses in one line naming the holder (pid, host, command, since). The kernel drops a lock
  when its holder dies, so a killed process never leaves a stale lock behind.
- **Read leases** (`leased`): a training run holds a shared read lease on its arm while it runs,
  one file per run in `arms/<arm>/leases/` (beside `data/`, so swapping a new `data/` into place
  cannot delete it). Any number of runs may read an arm; prepare, pull and delete need it free
  (`check_writable`, `writing`). Taking a lease and swapping a data dir both happen under the
  arm's lock (`arms/<arm>/leases/.lock`), and a swap re-checks the leases under it, so a train
  and a prepare --overwrite of one arm are safe in either order: the train reads the old dir and
  the swap is refused, or the swap finishes first and the train reads the new dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.names import check_name

LEGACY_LEASE = ".lease"  # armlab 0.1's one exclusive lease, inside the data dir (still honoured)
LEASES_DIR = "leases"
LOCKS_DIR = "locks"
WAIT_NOTICE_S = 0.5  # a lock that is not free within this long gets a "waiting for ..." line
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

    # Names become path components here; `check_name` refuses one that would leave its directory
    # (`../data`, `a/b`) even if an entry point forgot to check it (armlab.names).
    def arm_dir(self, arm: str) -> Path:
        return self.root / "arms" / check_name(arm, "arm name")

    def data_dir(self, arm: str) -> Path:
        return self.arm_dir(arm) / "data"

    def runs_dir(self, arm: str) -> Path:
        return self.arm_dir(arm) / "runs"

    def run_dir(self, arm: str, run: str) -> Path:
        return self.runs_dir(arm) / check_name(run, "run name")

    def leases_dir(self, arm: str) -> Path:
        return lease_dir(self.data_dir(arm))

    @property
    def locks_dir(self) -> Path:
        return self.root / LOCKS_DIR

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def all_run_dirs(self) -> list[Path]:
        """Every run dir of every arm, sorted (arms/<arm>/runs/<run>/ holding a run.json)."""
        return sorted(p.parent for p in self.root.glob("arms/*/runs/*/run.json"))


def run_name(arm: str, seed: int, depth: int | None = None) -> str:
    """Default run name: one run per arm per seed (and per depth, in a ladder:
    `Experiment.run_name` passes it)."""
    return f"{arm}-s{seed}" if depth is None else f"{arm}-d{depth}-s{seed}"


def open_workdir(exp: Any, create: bool = True) -> Workdir:
    """The experiment's workdir; `create` makes the dir (and proves it writable).

    A workdir that already holds a different experiment (another name) is refused. Nothing else is
    written here: the frozen spec is written by `freeze_spec`, which a command calls once its input
    has proved valid, so a refused command leaves the workdir as it was.
    """
    root = exp.workdir_path
    wd = Workdir(root)
    if root.exists() and not root.is_dir():
        raise ArmlabError(f"{root}: the workdir is a file, not a directory; move it, or set 'workdir' in the experiment file to a directory")
    frozen = wd.root / "experiment.json"
    if frozen.is_file():
        old = json.loads(frozen.read_text())
        if old.get("name") != exp.name:
            raise ArmlabError(
                f"{root}: workdir belongs to experiment {old.get('name')!r}, not {exp.name!r}; choose another workdir"
            )
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ArmlabError(
                f"{root}: workdir is not writable ({e.strerror}); make it writable, or set 'workdir' in the experiment file to a writable dir"
            ) from None
    return wd


def freeze_spec(wd: Workdir, exp: Any) -> None:
    """Write the spec the workdir now holds as experiment.json + experiment.toml (`armlab status
    WORKDIR` and the other commands read it back). Called by a command that has done, or is about
    to do, work under `exp`: never by a refused one."""
    data = exp.model_dump(mode="json")
    frozen = wd.root / "experiment.json"
    if frozen.is_file() and read_json(frozen) == json.loads(json.dumps(data)) and wd.experiment_toml.is_file():
        return  # unchanged: not even the mtime moves
    atomic_write_json(frozen, data)
    atomic_write_text(wd.experiment_toml, to_toml(exp.model_dump(mode="json", exclude_none=True)))


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
        raise ArmlabError(
            f"{path}: unreadable JSON ({e}); delete it or rerun the step that writes it"
        ) from None


def cleanup_temp_files(directory: str | Path) -> int:
    """Remove temp files left by killed writers (`.<name>.*.tmp`); returns how many."""
    n = 0
    for p in Path(directory).glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n


# -- locks ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Holder:
    """Who holds a lock (written beside it by the holder, read by whoever finds it busy)."""

    pid: int
    host: str
    command: str
    since: float

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.since))
        age = time.time() - self.since
        ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min"
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {when}, {ago} ago)"


def _holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(f"{lock_path.name}.holder")  # not *.json: never read as a lease


def _read_holder(lock_path: Path) -> Holder | None:
    try:
        d = json.loads(_holder_file(lock_path).read_text())
        return Holder(int(d["pid"]), str(d["host"]), str(d["command"]), float(d["since"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet (the holder is starting), or torn


def _command_line() -> str:
    argv = [os.path.basename(sys.argv[0]) or "python", *sys.argv[1:]] if sys.argv else ["?"]
    if argv[0] in ("-c", "__main__.py"):
        argv[0] = "armlab"
    line = shlex.join(argv)
    return line if len(line) <= 120 else line[:117] + "..."


@contextlib.contextmanager
def hold_lock(
    lock_path: Path, what: str, wait: bool, say: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the OS file lock `lock_path` (flock: dropped by the kernel when the holder dies).

    When another process holds it: `wait` prints one "waiting for ..." line (after WAIT_NOTICE_S)
    and blocks; otherwise one ArmlabError line names the holder. Re-entrant within a process.
    """
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(lock_path, thread_local=False, is_singleton=True, preserve_lock_file=True)
    outer = not lock.is_locked
    try:
        lock.acquire(timeout=WAIT_NOTICE_S if wait else 0)
    except Timeout:
        holder = _read_holder(lock_path)
        who = holder.describe() if holder else "another armlab process (starting up)"
        if not wait:
            raise ArmlabError(f"{what}: busy: held by {who}; wait for it to finish, or stop it") from None
        (say or _say)(f"{what}: waiting for {who} to finish")
        lock.acquire()
    try:
        if outer:
            body = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": _command_line(),
                "since": time.time(),
            }
            atomic_write_json(_holder_file(lock_path), body)
        yield
    finally:
        if outer:
            with contextlib.suppress(FileNotFoundError):
                _holder_file(lock_path).unlink()
        lock.release()


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


STEPS = ("prepare", "tokenizer", "export", "run")  # run: one `armlab run` per workdir at a time


def step_lock(wd: Workdir, step: str, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """One writer per experiment step (`prepare`, `tokenizer`, `export`, `run`) of a workdir.

    `prepare` and `tokenizer` wait (their outputs are idempotent: the second process then finds
    them up to date and does nothing, which is what a relaunched pane or `launch` on a host where
    a prepare is still running wants). `export` and `run` refuse (two exports, or two `armlab run`
    training one workdir's lanes, are a mistake: the second is told which process holds it)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}")
    return hold_lock(wd.locks_dir / f"{step}.lock", f"{step} in {wd.root}", wait)


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
    """A training run's read lease on an arm's data dir (one file per run)."""

    pid: int
    host: str
    started: float
    run: str
    path: str = ""  # the lease file

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


def lease_dir(data_dir: str | Path) -> Path:
    """`arms/<arm>/leases/` for `arms/<arm>/data/`: beside the data dir, never inside it."""
    return Path(data_dir).parent / LEASES_DIR


def _arm_lock(data_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """The short lock under which leases are taken and the data dir is swapped."""
    return hold_lock(lease_dir(data_dir) / ".lock", f"{data_dir}", wait=True)


def _lease_file(data_dir: str | Path, run: str) -> Path:
    return lease_dir(data_dir) / f"{run.replace('/', '_')}.json"


def _parse_lease(p: Path) -> Lease | None:
    try:
        d = json.loads(p.read_text())
        return Lease(int(d["pid"]), str(d["host"]), float(d["started"]), str(d["run"]), str(p))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # A torn or foreign lease file: treat as held by an unknown live process (safe side).
        with contextlib.suppress(OSError):
            return Lease(-1, "<unreadable lease>", p.stat().st_mtime, p.stem, str(p))
        return None


def read_leases(data_dir: str | Path) -> list[Lease]:
    """Every read lease on a data dir (and armlab 0.1's exclusive `.lease` inside it, if any)."""
    mine = [p for p in sorted(lease_dir(data_dir).glob("*.json")) if not p.name.startswith(".")]
    paths = [*mine, Path(data_dir) / LEGACY_LEASE]
    return [lease for p in paths if (lease := _parse_lease(p)) is not None]


def read_lease(data_dir: str | Path) -> Lease | None:
    """One lease on the data dir, a live one first (for status lines); None when there is none."""
    leases = read_leases(data_dir)
    return next((x for x in leases if x.alive), leases[0] if leases else None)


def check_writable(data_dir: str | Path, force: bool = False, action: str = "write") -> None:
    """Refuse to write into a data dir any run reads (DESIGN.md invariant 5).

    A live holder on this host always refuses. A dead holder (stale lease) or one on another
    host (which may be dead) refuses unless `force`, which then removes those leases.
    """
    leases = read_leases(data_dir)
    live = [x for x in leases if x.alive and x.local]
    other = [x for x in leases if x.alive and not x.local]
    dead = [x for x in leases if not x.alive]
    more = len(live) + len(other) - 1
    also = f" and {more} more run{'s' if more > 1 else ''}" if more > 0 else ""
    if live:
        raise ArmlabError(f"{data_dir}: refusing to {action}: leased by live {live[0].describe()}{also}")
    if other and not force:
        raise ArmlabError(
            f"{data_dir}: refusing to {action}: leased by live {other[0].describe()}{also}; "
            "it may be dead, then rerun with --force"
        )
    if dead and not force:
        raise ArmlabError(
            f"{data_dir}: refusing to {action}: stale lease from dead {dead[0].describe()}; rerun with --force to take over"
        )
    for x in other + dead:
        with contextlib.suppress(FileNotFoundError):
            Path(x.path).unlink()


@contextlib.contextmanager
def writing(data_dir: str | Path, force: bool = False, action: str = "write") -> Iterator[None]:
    """Replace or delete a data dir: hold the arm's lock, check no run reads it, then yield (the
    caller swaps or deletes under the lock, so no lease can be taken in between)."""
    with _arm_lock(data_dir):
        check_writable(data_dir, force=force, action=action)
        yield


def acquire_lease(
    data_dir: str | Path, run: str, force: bool = False, manifest_sha256: str | None = None
) -> Lease:
    """Take a shared read lease on the data dir for run `run` of this process.

    Other runs' leases do not matter (readers share). This run's own lease refuses while its
    holder lives (it is running already); a dead one on this host (a killed launcher) is taken
    over, one on another host needs `force`. `manifest_sha256`: the data the run was planned
    on; refused if the dir now holds other data (a prepare swapped it in since).
    """
    data_dir = Path(data_dir)
    with _arm_lock(data_dir):
        for old in read_leases(data_dir):
            if old.run != run:
                continue
            if old.alive and (old.local or not force):
                extra = "" if old.local else "; if it is dead, rerun with --force"
                raise ArmlabError(f"{data_dir}: already leased by {old.describe()}{extra}")
            with contextlib.suppress(FileNotFoundError):
                Path(old.path).unlink()
        if manifest_sha256 is not None:
            import hashlib

            try:
                now = hashlib.sha256((data_dir / "manifest.json").read_bytes()).hexdigest()
            except FileNotFoundError:
                now = None
            if now != manifest_sha256:
                raise ArmlabError(
                    f"{data_dir}: the arm's data changed since run {run!r} was planned (a prepare replaced it); "
                    "start the run again"
                )
        path = _lease_file(data_dir, run)
        lease = Lease(os.getpid(), socket.gethostname(), time.time(), run, str(path))
        atomic_write_json(path, {"pid": lease.pid, "host": lease.host, "started": lease.started, "run": run})
    return lease


def release_lease(data_dir: str | Path, lease: Lease) -> None:
    """Remove the lease if it is still ours (same run, pid and host)."""
    for current in read_leases(data_dir):
        if (current.run, current.pid, current.host) == (lease.run, lease.pid, lease.host):
            with contextlib.suppress(FileNotFoundError):
                Path(current.path).unlink()


@contextlib.contextmanager
def leased(
    data_dir: str | Path, run: str, force: bool = False, manifest_sha256: str | None = None
) -> Iterator[Lease]:
    """Hold a shared read lease on the data dir for the block (see `acquire_lease`)."""
    lease = acquire_lease(data_dir, run, force=force, manifest_sha256=manifest_sha256)
    try:
        yield lease
    finally:
        release_lease(data_dir, lease)
