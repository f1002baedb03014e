"""`armlab setup` into a venv it creates: with `--no-deps` on a host that lacks armlab's
dependencies, the refusal names the module that does not import and what to do (0.1 said only
"ModuleNotFoundError"). A real sshd on loopback, a real venv, a real wheel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sshd_util import sshd_hosts

pytestmark = pytest.mark.e2e


def test_setup_names_the_missing_module(tmp_path: Path) -> None:
    python = tmp_path / "fresh" / "venv" / "bin" / "python"
    with sshd_hosts(tmp_path / "sshd", aliases=("hosta",)) as hosts:
        r = subprocess.run(
            ["armlab", "setup", "hosta", "--python", str(python), "--base-python", sys.executable, "--no-deps"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "ARMLAB_SSH_CONFIG": str(hosts.config)},
        )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    assert "creating venv" in r.stderr and python.exists()  # the venv was made (bare: no site packages)
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("armlab: error: host 'hosta': armlab still not importable by "), err
    assert "ModuleNotFoundError: No module named '" in err and "rerun without --no-deps" in err, err
    assert "Traceback" not in r.stderr
