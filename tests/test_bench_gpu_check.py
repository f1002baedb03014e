"""bench/gpu_check.sh's CPU dry run: the whole GPU check (setup, armlab at two depths with the
loader, nanochat's base_train from the shared snapshot at the same configs, the summary with
the ratio) on tiny models, so the script is known to work before it meets a GPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from reference_util import NANOCHAT

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"


@pytest.mark.e2e
def test_dry_run_measures_both_trainers_and_summarises() -> None:
    if not (NANOCHAT / "nanochat").is_dir():
        pytest.skip(f"nanochat snapshot not found at {NANOCHAT}")
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    r = subprocess.run([str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    rows = {
        m[1]: m
        for m in re.finditer(
            r"^\s+(\d+)\s+(\d+)\s+([\d,]+)\s+(\S+)\s+(\S+)\s+(\S+)\s+([\d,]+)\s+([\d.]+)\s+sdpa \(SSSL\)$",
            out,
            re.M,
        )
    }
    assert set(rows) == {"2", "3"}, out[-2000:]
    assert rows["2"][6] != "-" and rows["3"][6] == "-"  # the loader is measured once, beside the first depth
    for m in rows.values():
        armlab, nanochat, ratio = float(m[3].replace(",", "")), float(m[7].replace(",", "")), float(m[8])
        assert armlab > 0 and nanochat > 0 and ratio == pytest.approx(armlab / nanochat, abs=0.01)
    assert "nanochat base_train (92d63d4, eager)" in out and "gpu_check: done in" in out


def test_bad_usage_and_a_python_without_torch_are_refused() -> None:
    r = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage: bench/gpu_check.sh" in r.stdout
    r = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, env={**os.environ, "PYTHON": "/bin/false"}
    )
    assert r.returncode == 2 and "has no torch" in r.stdout
