"""status: a real writer process paused with SIGSTOP shows STALLED, SIGCONT brings it back,
killing it shows dead; a run dir copied from another host shows `?` for liveness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from armlab.ops.status import collect_status, experiment_status, status_table
from armlab.workdir import open_workdir
from results_util import make_run, tiny_experiment

# A stand-in trainer that follows the run-dir contract: state.json (running, its own pid, this
# host) and one metrics line + train.log line per step, every 50 ms.
WRITER = textwrap.dedent("""
    import json, os, socket, sys, time
    from pathlib import Path
    d = Path(sys.argv[1])
    t0 = time.time()
    state = {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), "started": t0,
             "updated": t0, "ended": None, "error": None, "step": 0, "num_iterations": 100000}
    (d / "state.json").write_text(json.dumps(state))
    step = 0
    while True:
        step += 1
        with open(d / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "tokens": step * 512, "time": time.time() - t0, "train_loss": 4.0,
                                "lr_mult": 1.0, "dt": 0.05, "tok_per_s": 10240.0, "mfu": 0.5, "epoch": step / 1000}) + "\\n")
        with open(d / "train.log", "a") as f:
            f.write(f"step {step:05d}/100000 | loss 4.00\\n")
        time.sleep(0.05)
""")


def wait_for(cond, timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.e2e
def test_sigstop_shows_stalled_and_sigcont_recovers(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    run_dir = make_run(exp, "top", 0, bpb=2.0, state="running")
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "state.json").unlink()
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run_dir)])
    try:
        stall = 1.0
        wait_for(lambda: (run_dir / "metrics.jsonl").exists())

        def state() -> str:
            (s,) = collect_status([run_dir], stall_after_s=stall)
            return s.state

        wait_for(lambda: state() == "running")
        (s,) = collect_status([run_dir], stall)
        assert s.alive is True and s.step > 0 and s.tok_per_s == 10240.0 and s.eta_s > 0
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(stall + 0.5)
        (s,) = collect_status([run_dir], stall)
        assert s.state == "STALLED" and s.alive is True and s.last_log_age_s > stall
        os.kill(proc.pid, signal.SIGCONT)
        wait_for(lambda: state() == "running", timeout=3)
        proc.kill()
        proc.wait()
        (s,) = collect_status([run_dir], stall)
        assert s.state == "dead" and s.alive is False  # state.json still says running; the pid is gone
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_copied_from_dead_host_and_queued(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    done = make_run(exp, "top", 0, bpb=1.5)
    copied = make_run(exp, "random", 0, bpb=1.7, state="running")
    st = json.loads((copied / "state.json").read_text())
    st["host"] = "gpu-b-that-died"
    (copied / "state.json").write_text(json.dumps(st))
    old = time.time() - 3600
    for p in copied.iterdir():
        os.utime(p, (old, old))
    rows = {r.run: r for r in experiment_status(exp, stall_after_s=600)}
    assert rows["top-s0"].state == "done" and rows["top-s0"].val_bpb == pytest.approx(1.5)
    assert rows["random-s0"].state == "STALLED" and rows["random-s0"].alive is None
    assert rows["random-s0"].last_log_age_s > 3000
    assert rows["top-s1"].state == "queued" and rows["random-s1"].state == "queued"
    # the table renders every row, `?` for the other host's pid
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(status_table(list(rows.values())))
    text = console.export_text()
    assert "STALLED" in text and "queued" in text and " ? " in text
    assert open_workdir(exp, create=False).all_run_dirs() == sorted([done, copied])
