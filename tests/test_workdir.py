"""Workdir layout, atomic writes and data-dir leases (DESIGN.md invariants 5 and 6)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.spec import load_experiment, parse_experiment
from armlab.workdir import (
    Workdir,
    acquire_lease,
    atomic_path,
    check_writable,
    freeze_spec,
    leased,
    open_workdir,
    read_lease,
    read_leases,
    release_lease,
    step_lock,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "f.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


@pytest.fixture
def arm_data(tmp_path: Path) -> Path:
    d = tmp_path / "arms" / "a" / "data"
    d.mkdir(parents=True)
    return d


def write_lease(data: Path, run: str, pid: int, host: str | None = None) -> Path:
    p = data.parent / "leases" / f"{run}.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": time.time(), "run": run}))
    return p


def test_lease_blocks_writers_while_holder_lives(arm_data: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lease(arm_data, "r-s0", holder.pid)
        with pytest.raises(ArmlabError, match="leased by live run 'r-s0'"):
            check_writable(arm_data)
        with pytest.raises(ArmlabError, match="leased by live"):
            check_writable(arm_data, force=True)  # --force never overrides a live holder
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ArmlabError, match="stale lease.*--force"):
        check_writable(arm_data)
    check_writable(arm_data, force=True)  # dead holder + --force: stale lease removed
    assert read_lease(arm_data) is None


def test_lease_from_another_host_needs_force(arm_data: Path) -> None:
    write_lease(arm_data, "x", 1, host="elsewhere")
    with pytest.raises(ArmlabError, match="elsewhere"):
        check_writable(arm_data)
    check_writable(arm_data, force=True)
    assert read_leases(arm_data) == []


def test_legacy_lease_inside_the_data_dir_is_honoured(arm_data: Path) -> None:
    """A 0.1 run's exclusive `.lease` inside data/ still blocks writers after an upgrade."""
    (arm_data / ".lease").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "run": "old"}))
    with pytest.raises(ArmlabError, match="leased by live run 'old'"):
        check_writable(arm_data)


def test_read_leases_are_shared_and_live_outside_the_data_dir(arm_data: Path) -> None:
    a = acquire_lease(arm_data, "a")
    b = acquire_lease(arm_data, "b")  # another run reads the same arm: fine
    assert {x.run for x in read_leases(arm_data)} == {"a", "b"}
    assert not list(arm_data.iterdir()), "leases live beside data/, where a swap cannot delete them"
    with pytest.raises(ArmlabError, match="already leased by run 'a'"):
        acquire_lease(arm_data, "a")  # the same run twice: it is running already
    with pytest.raises(ArmlabError, match="leased by live run 'a'.* and 1 more run"):
        check_writable(arm_data, action="prepare 'a'")
    release_lease(arm_data, a)
    with pytest.raises(ArmlabError, match="leased by live run 'b'"):
        check_writable(arm_data)
    release_lease(arm_data, b)
    check_writable(arm_data)
    with leased(arm_data, "c") as c:
        assert read_lease(arm_data) == c
    assert read_lease(arm_data) is None


def test_dead_lease_of_the_same_run_is_taken_over(arm_data: Path) -> None:
    write_lease(arm_data, "r", 2**22 + 12345)  # no such pid: a killed launcher
    lease = acquire_lease(arm_data, "r")
    assert read_leases(arm_data) == [lease] and lease.pid == os.getpid()


def test_lease_refuses_data_changed_since_the_run_was_planned(arm_data: Path) -> None:
    (arm_data / "manifest.json").write_text('{"complete": true, "files": []}')
    planned = hashlib.sha256((arm_data / "manifest.json").read_bytes()).hexdigest()
    with leased(arm_data, "r", manifest_sha256=planned):
        pass
    (arm_data / "manifest.json").write_text('{"complete": true, "files": [], "new": 1}')
    with pytest.raises(ArmlabError, match="changed since run 'r' was planned"):
        acquire_lease(arm_data, "r", manifest_sha256=planned)
    assert read_leases(arm_data) == []


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from armlab.workdir import Workdir, step_lock
with step_lock(Workdir(Path(sys.argv[1])), "export"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_step_lock_refuses_or_waits_naming_the_holder(tmp_path: Path) -> None:
    wd = Workdir(tmp_path / "wd")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(wd.root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArmlabError, match=rf"export in .*: busy: held by pid {holder.pid} on .*since"), step_lock(wd, "export", wait=False):
            pass
        said: list[str] = []
        waiter = threading.Thread(target=_wait_for_lock, args=(wd, said))
        waiter.start()
        time.sleep(1.5)
        assert waiter.is_alive() and said == []  # still waiting for the holder
    finally:
        holder.kill()  # the kernel drops a dead holder's lock: no stale lock to clean up
        holder.wait()
    waiter.join(10)
    assert said == ["got it"]
    with step_lock(wd, "export", wait=False):
        pass


def _wait_for_lock(wd: Workdir, said: list[str]) -> None:
    with step_lock(wd, "export", wait=True):
        said.append("got it")


def test_freeze_spec_writes_once_and_open_workdir_refuses_other_experiment(tmp_path: Path) -> None:
    exp = parse_experiment(
        {
            "name": "one",
            "workdir": str(tmp_path / "wd"),
            "pool": {"uri": "p"},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5, "seed": 42}],
        }
    )
    wd = open_workdir(exp)
    assert not wd.experiment_toml.exists()  # opening writes no spec: a command freezes it once its work is done
    freeze_spec(wd, exp)
    assert load_experiment(wd.experiment_toml) == exp  # the frozen copy round-trips
    stamp = wd.experiment_toml.stat().st_mtime_ns
    freeze_spec(wd, exp)
    assert wd.experiment_toml.stat().st_mtime_ns == stamp  # unchanged spec: the files are not rewritten
    other = parse_experiment({**exp.model_dump(mode="json", exclude_none=True), "name": "two"})
    with pytest.raises(ArmlabError, match="belongs to experiment 'one'"):
        open_workdir(other)
