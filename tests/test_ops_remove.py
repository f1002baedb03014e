"""`armlab rm EXP --arm A --run R`: deletes one run dir; refuses a live run (a real process), an
active run of another host (unless --force) and bad names, each with one line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from armlab.ops.status import experiment_status
from results_util import make_run, tiny_experiment


def armlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("armlab: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_rm_deletes_a_finished_run(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    gone = make_run(exp, "top", 0, bpb=1.5)
    kept = make_run(exp, "top", 1, bpb=1.6)
    r = armlab("rm", str(exp.workdir_path), "--arm", "top", "--run", "top-s0", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"removed {gone}", r.stderr
    assert not gone.exists() and kept.is_dir()
    assert list(gone.parent.parent.iterdir()) == [gone.parent]  # no hidden leftovers in the arm dir
    rows = {x.run: x.state for x in experiment_status(exp)}
    assert rows["top-s0"] == "queued" and rows["top-s1"] == "done"


def test_rm_refuses_a_live_run(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = make_run(exp, "top", 0, bpb=1.5, state="running", pid=sleeper.pid)
        before = sorted(p.name for p in live.iterdir())
        r = armlab("rm", str(exp.workdir_path), "--arm", "top", "--run", "top-s0", cwd=tmp_path)
        refused(r, "is live", f"pid {sleeper.pid}", "armlab stop")
        assert sorted(p.name for p in live.iterdir()) == before
    finally:
        sleeper.kill()
        sleeper.wait()
    # the same run once its process is gone (state.json still says running): a dead run, deletable
    r = armlab("rm", str(exp.workdir_path), "--arm", "top", "--run", "top-s0", cwd=tmp_path)
    assert r.returncode == 0 and not live.exists(), r.stderr


def test_rm_of_another_hosts_active_run_needs_force(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    d = make_run(exp, "random", 0, bpb=1.5, state="running")
    st = json.loads((d / "state.json").read_text())
    (d / "state.json").write_text(json.dumps({**st, "host": "gpu-b"}))
    refused(armlab("rm", str(exp.workdir_path), "--arm", "random", "--run", "random-s0", cwd=tmp_path),
            "host 'gpu-b'", "--force")  # fmt: skip
    assert d.is_dir()
    r = armlab("rm", str(exp.workdir_path), "--arm", "random", "--run", "random-s0", "--force", cwd=tmp_path)
    assert r.returncode == 0 and not d.exists(), r.stderr


def test_rm_bad_names(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    make_run(exp, "top", 0, bpb=1.5)
    wd = str(exp.workdir_path)
    refused(armlab("rm", wd, "--arm", "tpo", "--run", "top-s0", cwd=tmp_path), "no arm named 'tpo'", "did you mean 'top'")
    refused(armlab("rm", wd, "--arm", "top", "--run", "top-s9", cwd=tmp_path),
            "arm 'top' has no run 'top-s9'", "did you mean 'top-s0'", "runs: top-s0")  # fmt: skip
    refused(armlab("rm", wd, "--arm", "top", "--run", "../runs", cwd=tmp_path), "--run '../runs' is not a valid name")
    refused(armlab("rm", wd, "--arm", "random", "--run", "random-s0", cwd=tmp_path), "it has no runs")
    refused(armlab("rm", wd, "--arm", "top", cwd=tmp_path), "Missing option '--run'")
    assert (exp.workdir_path / "arms" / "top" / "runs" / "top-s0" / "run.json").is_file()
