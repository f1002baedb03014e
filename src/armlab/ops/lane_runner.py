"""The process that trains one lane's runs, one after another (armlab.ops.lanes has its files).

`python -m armlab.ops.lane_runner QUEUE` (started by `lanes.start_lanes`), or `run_lane` in
process when `armlab run` has one lane. It loops: read the queue, take the first slot whose run
is not done, not live in another process and not yet tried by this runner, and train it in this
very process (`train.supervisor.train`): the runner is the run's supervisor, so the run's
state.json names the runner's pid and stopping that pid stops the lane. A failed run is recorded
in the lane's state and the lane goes on with the next; a signal (SIGTERM, SIGINT, SIGHUP) stops
the run (resumable) and the lane.

The queue is read again before each run, so a `launch` that adds seeds while the lane trains
appends to it. After a kill -9 the lane's lock goes with the process, the run it trained shows
`dead`, and the next `launch` (or `run`) starts a new runner that resumes that run from its last
checkpoint. A CPU lane pins itself to its share of the cores (`Slot.cpu_share`), as a GPU lane
trains on its own GPUs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from armlab import runs
from armlab.errors import ArmlabError, RunFailed
from armlab.ops.lanes import (
    LaneFiles,
    LaneState,
    LaneStatus,
    RunRef,
    locked,
    read_lane_state,
    read_queue,
    write_lane_state,
)
from armlab.ops.schedule import Slot
from armlab.progress import console
from armlab.runs import RunState
from armlab.spec import Experiment, fingerprint_diff
from armlab.workdir import open_workdir

LOCK_WAIT_S = 10  # a new runner waits this long for one that is just leaving
FOLLOW_POLL_S = 0.5  # a follower (node > 0) looks at its leader this often


class LaneStopped(Exception):
    """The runner got SIGTERM / SIGINT / SIGHUP between runs."""


# -- one run of a lane ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    run_dir: Path
    result: str  # "done" | "skipped" (done already / live elsewhere) | "failed" | "stopped"
    error: str | None = None


def train_slot(exp: Experiment, slot: Slot, echo: bool = True) -> Outcome:
    """Train one slot's run unless it is done or live; resume it if it exists (a crash, a stop, a kill)."""
    run_dir = open_workdir(exp, create=False).run_dir(slot.arm, slot.run)
    try:
        rec = runs.load_run(run_dir) if (run_dir / runs.RUN_JSON).is_file() else None
    except ArmlabError as e:
        return Outcome(run_dir, "failed", str(e))
    if rec is not None:
        want = json.loads(json.dumps(exp.comparability(), default=str))
        changed = fingerprint_diff(want, rec.info.get("comparability") or {})
        if changed:
            return Outcome(run_dir, "failed", (
                f"{run_dir.name}: trained with a different spec (differs in {', '.join(changed)}); "
                f"move {run_dir} away to retrain it, or use another workdir"
            ))  # fmt: skip
        if rec.state_name == RunState.DONE:
            return Outcome(run_dir, "skipped")
        if rec.live:
            return Outcome(run_dir, "failed", (
                f"{run_dir.name}: still running (pid {rec.state['pid']}); wait for it, see `armlab status`"
            ))  # fmt: skip
    return _train(exp, slot, run_dir, resume=rec is not None, node_rank=0, echo=echo)


def _train(exp: Experiment, slot: Slot, run_dir: Path, resume: bool, node_rank: int, echo: bool) -> Outcome:
    """`armlab train` of the slot's run, in this process: node `node_rank` of its nodes."""
    from armlab.train.plan import TrainOptions
    from armlab.train.supervisor import train

    cuda = slot.device == "cuda"
    per_node = slot.world_size // slot.nnodes
    nodes = {}
    if slot.nnodes > 1:  # one node of a run across machines: they meet at node 0's endpoint
        nodes = {"nnodes": slot.nnodes, "node_rank": node_rank, "rdzv_endpoint": slot.rdzv}
    options = TrainOptions(
        seed=slot.seed, run_name=slot.run, device=slot.device, num_gpus=per_node if cuda else None,
        nproc=None if cuda else per_node, master_port=slot.port if slot.nnodes == 1 else None, resume=resume,
        **nodes,
    )  # fmt: skip
    try:
        train(exp, slot.arm, options, echo=echo)
    except RunFailed as e:
        if runs.read_state(run_dir).get("state") == RunState.STOPPED:
            return Outcome(run_dir, "stopped", str(e))
        return Outcome(run_dir, "failed", f"{slot.run}: {e}")
    except ArmlabError as e:  # refused at plan time (port taken, data changed, ...): nothing was written
        return Outcome(run_dir, "failed", f"{slot.run}: {e}")
    return Outcome(run_dir, "done")


# -- the runner -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Between runs, a signal stops the lane; during a run the supervisor's own handlers stop the run."""

    def stop(signum: int, _frame: Any) -> None:
        raise LaneStopped(signal.Signals(signum).name)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _next_slot(exp: Experiment, slots: Sequence[Slot], tried: set[str]) -> Slot | None:
    wd = open_workdir(exp, create=False)
    for s in slots:
        if s.run in tried:
            continue
        try:
            st = runs.read_state(wd.run_dir(s.arm, s.run))
        except ArmlabError:
            return s  # torn state.json: train_slot says so, once
        if st.get("state") != RunState.DONE and not runs.is_live(st):
            return s
    return None


def run_lane(queue: Path, echo: bool = False) -> LaneStatus:
    """Train the lane's runs in order (see the module docstring); returns its final state."""
    files = LaneFiles.from_queue(queue)
    lock = FileLock(files.lock, thread_local=False)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        holder = read_lane_state(files).pid
        raise ArmlabError(
            f"lane {files.id} is already being trained by pid {holder} (another launch or `armlab run`); "
            "wait for it, or `armlab stop EXP`"
        ) from None
    failures: dict[str, str] = {}
    try:
        write_lane_state(
            files, state=LaneState.RUNNING, pid=os.getpid(), host=socket.gethostname(), started=time.time(),
            ended=None, current=None, failures={}, error=None,
        )  # fmt: skip
        tried: set[str] = set()
        with stop_on_signals():
            while True:
                with locked(files.queue_lock):
                    exp, slots = read_queue(files)
                    slot = _next_slot(exp, slots, tried)
                    if slot is None:
                        final = LaneState.FAILED if failures else LaneState.DONE
                        return write_lane_state(files, state=final, current=None, ended=time.time())
                    write_lane_state(files, current=RunRef(slot.arm, slot.run))
                tried.add(slot.run)
                verb = (
                    "resuming"
                    if (open_workdir(exp, create=False).run_dir(slot.arm, slot.run) / runs.RUN_JSON).is_file()
                    else "training"
                )
                console.print(
                    f"lane {files.id}: {verb} {slot.run} ({slots.index(slot) + 1}/{len(slots)} in the lane)"
                )
                out = train_slot(exp, slot, echo=echo)
                if out.result == "stopped":
                    return write_lane_state(
                        files, state=LaneState.STOPPED, ended=time.time(), error=out.error
                    )
                if out.result == "failed":
                    failures[slot.run] = out.error or "failed"
                    console.print(f"[red]lane {files.id}: {out.error}[/]")
                    write_lane_state(files, failures=failures)
                else:
                    console.print(f"lane {files.id}: {slot.run} {out.result}")
    except LaneStopped as e:
        return write_lane_state(
            files, state=LaneState.STOPPED, current=None, ended=time.time(), error=f"stopped by {e}"
        )
    except BaseException as e:
        write_lane_state(
            files,
            state=LaneState.FAILED,
            ended=time.time(),
            error=str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        raise
    finally:
        lock.release()


def follow_lane(queue: Path, node_rank: int, echo: bool = False) -> LaneStatus:
    """The lane's runner on node `node_rank` (> 0) of runs across machines: it trains no run of its
    own, it joins each run the lane's runner on node 0 (the leader) trains, as this node's ranks,
    until the leader's lane ends. The queue, the leader's state and the runs' state.json are on the
    workdir every node shares. A run is joined once per attempt of the leader (its state.json's
    `started`), so a run the leader resumes after a stop is joined again."""
    lane = LaneFiles.from_queue(queue)
    files = lane.follower(node_rank)
    lock = FileLock(files.lock, thread_local=False)
    try:
        lock.acquire(timeout=LOCK_WAIT_S)
    except Timeout:
        raise ArmlabError(
            f"lane {lane.id} on node {node_rank} is already followed by pid {read_lane_state(files).pid}"
        ) from None
    joined: set[tuple[str, Any]] = set()
    try:
        write_lane_state(files, state=LaneState.RUNNING, pid=os.getpid(), host=socket.gethostname(),
                         started=time.time(), ended=None, current=None, failures={}, error=None)  # fmt: skip
        with stop_on_signals():
            while True:
                leader = read_lane_state(lane)
                if leader.state != LaneState.RUNNING:
                    return write_lane_state(files, state=leader.state or LaneState.DONE, current=None,
                                            ended=time.time())  # fmt: skip
                exp, slots = read_queue(lane)
                cur = leader.current
                slot = next((s for s in slots if cur and s.run == cur.run), None)
                run_dir = open_workdir(exp, create=False).run_dir(slot.arm, slot.run) if slot else None
                st = runs.read_state(run_dir) if run_dir else {}
                attempt = (slot.run, st.get("started")) if slot else None
                if slot and st.get("state") in runs.ACTIVE and attempt not in joined:
                    joined.add(attempt)
                    write_lane_state(files, current=RunRef(slot.arm, slot.run))
                    console.print(f"lane {lane.id} node {node_rank}: joining {slot.run}")
                    out = _train(exp, slot, run_dir, resume=True, node_rank=node_rank, echo=echo)
                    console.print(f"lane {lane.id} node {node_rank}: {slot.run} {out.result}")
                    write_lane_state(files, current=None)
                time.sleep(FOLLOW_POLL_S)
    except LaneStopped as e:
        return write_lane_state(files, state=LaneState.STOPPED, current=None, ended=time.time(), error=f"stopped by {e}")
    finally:
        lock.release()


def main(queue: str, node_rank: int = 0) -> int:
    """The detached runner: `python -m armlab.ops.lane_runner <workdir>/lanes/<host>.lane<k>.json
    [NODE_RANK]` (a node rank > 0: the lane's runner on that node of runs across machines)."""
    files = LaneFiles.from_queue(Path(queue))
    try:
        _, slots = read_queue(files)
        share = slots[0].cpu_share if slots else None
        if share and share[1] > 1 and hasattr(os, "sched_setaffinity"):
            # a CPU lane trains on its own share of the cores, as a GPU lane on its own GPUs
            cores = sorted(os.sched_getaffinity(0))
            per = len(cores) // share[1]
            if per:
                mine = cores[share[0] * per : (share[0] + 1) * per]
                os.sched_setaffinity(0, mine)
                console.print(
                    f"lane {files.id}: on cores {','.join(map(str, mine))} ({share[1]} lanes share this machine)"
                )
        state = follow_lane(Path(queue), node_rank) if node_rank else run_lane(Path(queue), echo=False)
    except ArmlabError as e:
        print(f"armlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0 if state.state == LaneState.DONE else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
