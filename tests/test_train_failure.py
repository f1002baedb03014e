"""armlab.train.failure: a failed run names the rank at fault in one line, not the rank that lost it.

The end-to-end case is issue 20's: SIGKILL of one rank (what the OOM killer does) made the
supervisor print two tracebacks and blame the surviving rank's gloo error. Real run (2 gloo ranks
under torchrun); the ranks pause at step 2 (ARMLAB_TEST_PAUSE_STEP) so the kill lands between two
steps, and rank 0 is released once torchrun has seen rank 1 die.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from armlab import runs
from armlab.runs import RankError
from armlab.train.failure import failure_cause, root_cause
from train_util import ARM, build_workdir, run_dir, spawn, train_losses, wait_for, worker_procs

# What torchrun 2.13 printed when rank 1 of 2 was killed with SIGKILL (its summary, abridged)
SUMMARY = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
armlab.train.worker FAILED
-------------------------------------------------------
Failures:
[1]:
  time      : 2026-12-06_19:24:08
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 23574)
  error_file: <N/A>
  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-06_19:24:08
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 23575)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 23575
=======================================================""".splitlines()

GLOO = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"


def test_a_killed_rank_is_the_cause_not_the_peer_that_lost_it() -> None:
    assert root_cause(SUMMARY) is not None and (root_cause(SUMMARY).rank, root_cause(SUMMARY).exitcode) == (1, -9)
    survivor = RankError(0, "error", GLOO, 2.0)
    cause = failure_cause([survivor], SUMMARY, "exit code 1")
    assert cause.rank == 1 and cause.line.startswith("rank 1 was killed by SIGKILL (the kernel's OOM killer")
    assert cause.line.endswith("then rank 0 lost its peer")


def test_a_rank_error_wins_over_peers_that_lost_it_and_bad_input_is_its_line() -> None:
    crash = RankError(1, "error", "ValueError: bad batch", 2.0)
    lost = RankError(0, "error", GLOO, 1.0)  # earlier, but only a lost peer
    assert failure_cause([lost, crash], [], "exit code 1").line == "rank 1 failed: ValueError: bad batch"
    only_lost = failure_cause([lost], [], "exit code 1")
    assert only_lost.rank == 0 and "lost its peers" in only_lost.line and "died first" in only_lost.line
    full = RankError(0, "bad_input", "/ckpt: disk full: a checkpoint needs ~1 bytes", 1.0)
    assert failure_cause([full], [], "exit code 1") == failure_cause([full], SUMMARY[:3], "x")
    assert failure_cause([full], [], "exit code 1").bad_input
    launcher = failure_cause([], ["[E] torch.distributed.DistNetworkError: port taken"], "exit code 1")
    assert launcher.line == "training processes failed (exit code 1): [E] torch.distributed.DistNetworkError: port taken"


@pytest.mark.e2e
def test_sigkill_of_one_rank_names_it_in_one_line(tmp_path: Path) -> None:
    exp_file = build_workdir(tmp_path)
    go = tmp_path / "go"
    proc = spawn("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2", "--run-name", "oom",
                 "--num-iterations", "8", env={"ARMLAB_TEST_PAUSE_STEP": "2", "ARMLAB_TEST_PAUSE_FILE": str(go)})  # fmt: skip
    d = run_dir(exp_file, "oom")
    try:
        wait_for(lambda: max(train_losses(d), default=0) >= 2, timeout=120, what="step 2")
        (rank1,) = [p for p in worker_procs(d) if p.environ().get("RANK") == "1"]
        os.kill(rank1.pid, signal.SIGKILL)
        # torchrun saw it die (it then stops rank 0): release rank 0, which finds its peer gone
        wait_for(lambda: "closing signal SIGTERM" in (d / runs.TRAIN_LOG).read_text(), timeout=60, what="torchrun")
        go.touch()
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.stdout.read(), proc.stderr.read()
    (line,) = err.strip().splitlines()
    assert line.startswith("armlab: failed: rank 1 was killed by SIGKILL (the kernel's OOM killer, or a kill -9)")
    assert line.endswith(f"(see {d / runs.TRAIN_LOG})") and "rank 0 failed" not in line, line
    assert "Traceback" not in out + err and "Traceback" in (d / runs.TRAIN_LOG).read_text()  # kept in the log
    state = runs.read_run_state(d)
    assert state.state == "failed" and state.error.startswith("rank 1 was killed by SIGKILL")
