"""Workdir layout, atomic writes and data-dir leases (DESIGN.md invariants 5 and 6)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.spec import load_experiment, parse_experiment
from armlab.workdir import (
    acquire_lease,
    atomic_path,
    check_writable,
    leased,
    open_workdir,
    read_lease,
    release_lease,
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


def test_lease_blocks_writers_while_holder_lives(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease_file = tmp_path / ".lease"
        lease_file.write_text(
            json.dumps(
                {"pid": holder.pid, "host": socket.gethostname(), "started": time.time(), "run": "r-s0"}
            )
        )
        with pytest.raises(ArmlabError, match="leased by live run 'r-s0'"):
            check_writable(tmp_path)
        with pytest.raises(ArmlabError, match="leased by live"):
            check_writable(tmp_path, force=True)  # --force never overrides a live holder
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ArmlabError, match="stale lease.*--force"):
        check_writable(tmp_path)
    check_writable(tmp_path, force=True)  # dead holder + --force: stale lease removed
    assert read_lease(tmp_path) is None


def test_lease_from_another_host_needs_force(tmp_path: Path) -> None:
    (tmp_path / ".lease").write_text(
        json.dumps({"pid": 1, "host": "elsewhere", "started": time.time(), "run": "x"})
    )
    with pytest.raises(ArmlabError, match="elsewhere"):
        check_writable(tmp_path)
    check_writable(tmp_path, force=True)


def test_acquire_is_exclusive_and_released(tmp_path: Path) -> None:
    lease = acquire_lease(tmp_path, "a")
    with pytest.raises(ArmlabError, match="run 'a'"):
        acquire_lease(tmp_path, "b")
    release_lease(tmp_path, lease)
    with leased(tmp_path, "c") as l2:
        assert read_lease(tmp_path) == l2
    assert read_lease(tmp_path) is None


def test_open_workdir_freezes_spec_and_refuses_other_experiment(tmp_path: Path) -> None:
    exp = parse_experiment(
        {
            "name": "one",
            "workdir": str(tmp_path / "wd"),
            "pool": {"uri": "p"},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5, "seed": 42}],
        }
    )
    wd = open_workdir(exp)
    assert load_experiment(wd.experiment_toml) == exp  # the frozen copy round-trips
    other = parse_experiment({**exp.model_dump(mode="json", exclude_none=True), "name": "two"})
    with pytest.raises(ArmlabError, match="belongs to experiment 'one'"):
        open_workdir(other)
