"""How a training rank learns that it should stop, and how the ranks agree to.

A stop (Slurm's `--signal=USR1@N` before a time limit, a preemption's SIGTERM, Ctrl-C, `armlab
stop`) may reach any process of a run: the supervisor, torchrun, or the ranks themselves (Slurm
signals every task of a job step). Every path ends the same way: the ranks finish the step they
are in, agree (one small all-reduce at each step's end, so no rank waits in a collective the
others left), save a checkpoint unless they just saved that step, rank 0 writes state.json
`stopped` with `resume_step`, and every rank exits 0. The supervisor turns that into exit 130.

A rank learns of a stop in two ways: a signal it receives (SIGTERM, SIGINT, SIGHUP, SIGUSR1: the
handler only records it; the loop acts at the step's end) and, on each node's first rank, the
run's `stop-request` file (armlab.runs.request_stop), which the supervisor writes when it is
signalled and `armlab stop` writes before its SIGTERM. torchrun forwards the signals it gets to
the ranks (armlab.train.engines.rank_env adds SIGUSR1 to the ones it handles).

The lines the ranks print at the end (`STOP_LINE`, `DIVERGED_LINE`) are read by every node's
supervisor: node 0's reads state.json, the others have only these lines.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from armlab import runs

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
# How long the ranks get, once asked to stop, to finish their step and write a checkpoint before
# they are killed (the supervisor's and torchrun's wait). A d26 checkpoint is ~10 GB.
GRACE_S = int(os.environ.get("ARMLAB_STOP_GRACE_S", "300"))
STOP_LINE = "armlab: stopped at step {step} ({reason})"
DIVERGED_LINE = "armlab: diverged at step {step}: {detail}"
OUTCOME_RE = re.compile(r"^armlab: (stopped|diverged) at step (\d+)\b(.*)$")


class StopFlag:
    """The first stop signal this process got (handlers only record it)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def install(self) -> StopFlag:
        for s in SIGNALS:
            signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name

    def requested(self, run_dir: Path, reads_request: bool) -> str | None:
        """Why this rank should stop (None: it should not): the run's stop request when this rank
        reads it (each node's first rank; it says why, e.g. "armlab stop"), else its own signal."""
        requested = runs.read_stop_request(run_dir) if reads_request else None
        return requested or self.reason


def agree(reason: str | None, world_size: int, device: Any) -> str | None:
    """The ranks' common answer to "stop now?": a stop if any rank has one, with the first rank's
    reason. Every rank must call it at the same point of the loop (it is a collective)."""
    if world_size == 1:
        return reason
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1 if reason else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not int(flag.item()):
        return None
    reasons: list[Any] = [None] * world_size
    dist.all_gather_object(reasons, reason)
    return next(r for r in reasons if r)


def test_pause(step: int) -> None:
    """Test-only: ARMLAB_TEST_PAUSE_STEP=s ARMLAB_TEST_PAUSE_FILE=path makes every rank wait at
    the end of step s until `path` exists, so a test can signal a run at an exact step."""
    if os.environ.get("ARMLAB_TEST_PAUSE_STEP") != str(step):
        return
    path = Path(os.environ["ARMLAB_TEST_PAUSE_FILE"])
    while not path.exists():
        time.sleep(0.05)
