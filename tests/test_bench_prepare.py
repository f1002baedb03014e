"""`bench/prepare.py --tmp DIR` runs when DIR does not exist yet (it creates it) and prints its figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.e2e
def test_tmp_dir_is_created(tmp_path: Path, repo_root: Path) -> None:
    tmp = tmp_path / "not" / "there"
    r = subprocess.run(
        [sys.executable, str(repo_root / "bench" / "prepare.py"), "--gb", "0.001", "--repeat", "1",
         "--eval-docs", "20", "--tmp", str(tmp)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "armlab/2" in r.stdout and "text MB/s" in r.stdout
    assert tmp.is_dir() and list(tmp.iterdir()) == []  # its own temp dir inside is gone again
