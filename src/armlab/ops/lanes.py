"""Lanes as files and processes (armlab.ops.schedule places runs on them; armlab.ops.lane_runner
trains them):

    <workdir>/lanes/<host>.lane<k>.json        the queue: the experiment and the lane's slots, in order
    <workdir>/lanes/<host>.lane<k>.state.json  the runner: state, pid, host, current run, failures
    <workdir>/lanes/<host>.lane<k>.log         what a runner process printed (the ranks write train.log)
    <workdir>/lanes/<host>.lane<k>.lock        held by the runner for its whole life (flock: a kill drops it)

`start_lanes` writes each lane's queue and starts a runner for every lane without a live one
(detached for `launch`, so it outlives SSH; children of `armlab run` otherwise), each with its
lane's CUDA_VISIBLE_DEVICES; `read_lanes` / `lanes_by_run` are what `status` shows;
`stop_lanes` is what `stop` does. "Write the queue, is a runner alive?" happens under the
queue's lock, as does the runner's "nothing left, exit", so an appended run is never left
behind by a runner that was just leaving.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from armlab import runs
from armlab.errors import ArmlabError
from armlab.names import check_name
from armlab.ops.schedule import Slot, lane_id
from armlab.records import Record
from armlab.runs import RunState
from armlab.spec import Experiment, parse_experiment
from armlab.workdir import Workdir, atomic_write_json, read_json

LANES_DIR = "lanes"
START_WAIT_S = 90  # start_lanes waits this long for each new runner to start its first run


class LaneState:
    """What a lane's state.json says (plain strings, like RunState's written ones)."""

    RUNNING = "running"
    DONE = "done"  # every run of its queue is done (or was live elsewhere)
    FAILED = "failed"  # it finished, and some run failed
    STOPPED = "stopped"


@dataclass(frozen=True)
class LaneFiles:
    dir: Path
    host: str
    lane: int

    @classmethod
    def of(cls, root: Path, slot: Slot) -> LaneFiles:
        return cls(Path(root) / LANES_DIR, slot.host, slot.lane)

    @classmethod
    def from_queue(cls, queue: Path) -> LaneFiles:
        host, _, k = queue.name.removesuffix(".json").rpartition(".lane")
        return cls(queue.parent, host, int(k))

    def _file(self, suffix: str) -> Path:
        return self.dir / f"{check_name(self.host, 'host name')}.lane{self.lane}{suffix}"

    @property
    def id(self) -> str:
        return lane_id(self.host, self.lane)

    @property
    def queue(self) -> Path:
        return self._file(".json")

    @property
    def state(self) -> Path:
        return self._file(".state.json")

    @property
    def log(self) -> Path:
        return self._file(".log")

    @property
    def lock(self) -> Path:
        return self._file(".lock")

    @property
    def queue_lock(self) -> Path:
        return self._file(".queue.lock")

    def follower(self, node_rank: int) -> LaneFiles:
        """The files of the lane's runner on node `node_rank` (> 0) of a run across machines:
        `<host>.lane<k>.node<K>.state.json`, `.lock`, `.log` (it follows the lane's queue)."""
        return FollowerFiles(self.dir, self.host, self.lane, node_rank)


@dataclass(frozen=True)
class FollowerFiles(LaneFiles):
    node_rank: int = 1

    def _file(self, suffix: str) -> Path:
        if suffix in (".json", ".queue.lock"):  # the queue is the lane's own
            return super()._file(suffix)
        return self.dir / f"{self.host}.lane{self.lane}.node{self.node_rank}{suffix}"


@contextlib.contextmanager
def locked(path: Path, timeout: float = -1) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=timeout, thread_local=False)
    with lock:
        yield


# -- the queue and the runner's state ---------------------------------------------------------------------
@dataclass(frozen=True)
class LaneQueue(Record):
    """`<host>.lane<k>.json`: the experiment (as the runner trains it) and the lane's slots, in order."""

    lane: str
    experiment: dict[str, Any]
    slots: list[Slot]
    updated: float


@dataclass(frozen=True)
class RunRef(Record):
    arm: str
    run: str


@dataclass(frozen=True)
class LaneStatus(Record):
    """`<host>.lane<k>.state.json`: what the lane's runner says of itself (all None before one ran)."""

    state: str | None = None  # LaneState
    pid: int | None = None
    host: str | None = None
    started: float | None = None
    ended: float | None = None
    current: RunRef | None = None  # the run it trains now
    failures: dict[str, str] = field(default_factory=dict)  # run -> why it failed
    error: str | None = None  # why the lane itself stopped or failed
    updated: float | None = None


def write_queue(files: LaneFiles, exp: Experiment, slots: Sequence[Slot]) -> None:
    queue = LaneQueue(files.id, exp.model_dump(mode="json"), list(slots), time.time())
    atomic_write_json(files.queue, queue.to_json())


def queue_lane(wd: Workdir, exp: Experiment, slots: Sequence[Slot]) -> LaneFiles:
    """Write a lane's queue (under its lock, so a runner deciding to leave sees it first)."""
    files = LaneFiles.of(wd.root, slots[0])
    with locked(files.queue_lock):
        write_queue(files, exp, slots)
    return files


def read_queue(files: LaneFiles) -> tuple[Experiment, list[Slot]]:
    queue = LaneQueue.from_json(read_json(files.queue), str(files.queue))
    return parse_experiment(queue.experiment, str(files.queue)), queue.slots


def read_lane_state(files: LaneFiles) -> LaneStatus:
    try:
        return LaneStatus.from_json(read_json(files.state), str(files.state))
    except FileNotFoundError:
        return LaneStatus()


def write_lane_state(files: LaneFiles, **fields: Any) -> LaneStatus:
    """Update the lane's state file with `fields` (and `updated`), keeping the others."""
    old = read_lane_state(files)
    base = old if old.state is not None else LaneStatus(state=LaneState.RUNNING, host=socket.gethostname())
    state = dataclasses.replace(base, **fields, updated=time.time())
    atomic_write_json(files.state, state.to_json())
    return state


def lane_alive(state: LaneStatus) -> bool:
    """A runner owns the lane: its state says running and its pid lives on this host."""
    return state.state == LaneState.RUNNING and runs.owner_alive({"pid": state.pid, "host": state.host}) is True


# -- starting runners -------------------------------------------------------------------------------------
def visible_devices(gpus: Sequence[int], inherited: str | None) -> str:
    """CUDA_VISIBLE_DEVICES for a lane: its GPU indices, counted among the GPUs this process sees
    (an inherited CUDA_VISIBLE_DEVICES=4,5,6,7 makes lane GPUs 0,1 the physical 4,5)."""
    if not inherited:
        return ",".join(map(str, gpus))
    seen = [d.strip() for d in inherited.split(",") if d.strip()]
    if max(gpus) >= len(seen):
        raise ArmlabError(
            f"a lane needs GPU {max(gpus)} but CUDA_VISIBLE_DEVICES={inherited} shows {len(seen)}; "
            "lower num_gpus, or unset CUDA_VISIBLE_DEVICES"
        )
    return ",".join(seen[i] for i in gpus)


def _spawn(files: LaneFiles, slot: Slot, detach: bool) -> subprocess.Popen:
    env = dict(os.environ)
    if slot.device == "cuda" and slot.gpus:
        env["CUDA_VISIBLE_DEVICES"] = visible_devices(slot.gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    files.dir.mkdir(parents=True, exist_ok=True)
    node = [str(files.node_rank)] if isinstance(files, FollowerFiles) else []
    with open(files.log, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "armlab.ops.lane_runner", str(files.queue), *node],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=detach, preexec_fn=None if detach else runs.die_with_parent,
        )  # fmt: skip


@dataclass
class LaneStart:
    lane: str
    action: str  # "started" | "running" (a runner was alive: it reads the new queue) | "nothing to do"
    pid: int | None
    error: str | None = None  # the first run failed before training (e.g. a refused plan)
    proc: subprocess.Popen | None = field(default=None, repr=False)



def start_followers(wd: Workdir, lanes: Sequence[Sequence[Slot]], node_rank: int) -> list[LaneStart]:
    """On node `node_rank` of runs across machines: a detached follower runner for every lane
    without a live one here (armlab.ops.lane_runner.follow_lane); the lanes' queues are node 0's."""
    out = []
    for slots in lanes:
        files = LaneFiles.of(wd.root, slots[0]).follower(node_rank)
        st = read_lane_state(files)
        if lane_alive(st):
            out.append(LaneStart(files.id, "running", st.pid))
        else:
            proc = _spawn(files, slots[0], detach=True)
            out.append(LaneStart(files.id, "started", proc.pid, proc=proc))
    return out


def _first_run_started(wd: Workdir, files: LaneFiles, pid: int) -> tuple[bool, str | None]:
    """(settled, error): the runner supervises a run, failed one, or finished; else still starting."""
    st = read_lane_state(files)
    if st.pid != pid:
        return False, None
    if st.failures:
        return True, next(iter(st.failures.values()))
    if st.state != LaneState.RUNNING:
        return True, st.error if st.state == LaneState.FAILED else None
    if st.current:
        rs = runs.read_state(wd.run_dir(st.current.arm, st.current.run))
        if rs.get("pid") == pid and rs.get("state") in runs.ACTIVE:
            return True, None
    return False, None


def start_lanes(
    wd: Workdir,
    exp: Experiment,
    lanes: Sequence[Sequence[Slot]],
    detach: bool = True,
    wait_s: float = START_WAIT_S,
) -> list[LaneStart]:
    """Write each lane's queue and start a runner for each lane that has none alive; then wait
    until every new runner trains its first run (or failed it), so a refusal is reported here."""
    out: list[tuple[LaneStart, LaneFiles]] = []
    for slots in lanes:
        files = LaneFiles.of(wd.root, slots[0])
        with locked(files.queue_lock):
            write_queue(files, exp, slots)
            st = read_lane_state(files)
            if lane_alive(st):
                out.append((LaneStart(files.id, "running", st.pid), files))
                continue
            proc = _spawn(files, slots[0], detach)
            out.append((LaneStart(files.id, "started", proc.pid, proc=proc), files))
    deadline = time.time() + wait_s
    for start, files in out:
        while start.proc is not None and time.time() < deadline:
            settled, start.error = _first_run_started(wd, files, start.proc.pid)
            if settled:
                break
            if start.proc.poll() is not None:
                settled, start.error = _first_run_started(wd, files, start.proc.pid)
                if not settled:  # it never owned the lane: another runner does, or it died at start
                    st = read_lane_state(files)
                    alive = lane_alive(st)
                    start.action, start.pid = ("running", st.pid) if alive else ("failed", None)
                    start.error = None if alive else _log_tail(files.log)
                break
            time.sleep(0.2)
    return [start for start, _ in out]


def _log_tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "the lane runner exited at start"
    return lines[-1].strip() if lines else "the lane runner exited at start"


# -- what status and stop see -----------------------------------------------------------------------------
@dataclass(frozen=True)
class LaneView(Record):
    """A lane as `status` and `stop` see it (on its host, or mirrored from there)."""

    id: str
    host: str
    lane: int
    state: str | None  # LaneState, or None: queued, no runner started yet
    alive: bool
    pid: int | None
    current: tuple[str, str] | None  # (arm, run) it trains now
    runs: tuple[tuple[str, str], ...]  # (arm, run) in lane order
    failures: dict[str, str]
    updated: float | None

    def label(self) -> str:
        """`gpu-a:1`; `gpu-a:1 (stopped)` / `(dead)` / `(not started)` when runs wait on a lane
        whose runner is not alive (a finished lane is plain `gpu-a:1`)."""
        if self.alive or self.state in (LaneState.DONE, LaneState.FAILED):
            return self.id
        if self.state == LaneState.RUNNING:
            return f"{self.id} (dead)"
        return f"{self.id} ({self.state or 'not started'})"


def read_lanes(root: Path) -> list[LaneView]:
    """Every lane of a workdir (`<root>/lanes/*.json`), from its queue and its runner's state."""
    out = []
    for queue in sorted((Path(root) / LANES_DIR).glob("*.lane*.json")):
        if queue.name.endswith(".state.json"):
            continue
        files = LaneFiles.from_queue(queue)
        try:
            slots = LaneQueue.from_json(read_json(queue), str(queue)).slots
            st = read_lane_state(files)
        except ArmlabError:
            continue  # a torn or foreign file: not a lane this armlab can show
        cur = st.current
        out.append(
            LaneView(
                id=files.id,
                host=files.host,
                lane=files.lane,
                state=st.state,
                alive=lane_alive(st),
                pid=st.pid,
                current=(cur.arm, cur.run) if cur and lane_alive(st) else None,
                runs=tuple((s.arm, s.run) for s in slots),
                failures=dict(st.failures),
                updated=st.updated,
            )  # fmt: skip
        )
    return out


MIRRORED_LANES = "lanes.json"  # <workdir>/remote/<host>/lanes.json: the host's lanes as it saw them


def lanes_by_run(root: Path) -> dict[tuple[str, str], LaneView]:
    """(arm, run) -> the lane that has it: this workdir's lanes and those mirrored from hosts
    (`remote/<host>/lanes.json`). A run in several lanes (a layout changed between launches)
    maps to the live one, else the one updated last."""
    views = read_lanes(root)
    for path in sorted(Path(root).glob(f"remote/*/{MIRRORED_LANES}")):
        with contextlib.suppress(ArmlabError, KeyError, TypeError, ValueError):
            views += [LaneView.from_json(v) for v in read_json(path)]
    out: dict[tuple[str, str], LaneView] = {}
    for v in sorted(views, key=lambda v: (v.alive, v.updated or 0.0)):
        for key in v.runs:
            out[key] = v  # later (live, newer) wins
    return out


@dataclass(frozen=True)
class StopRow(Record):
    """One run `armlab stop` touched: stopped, or queued on a stopped lane and not started."""

    arm: str
    run: str
    pid: int | None
    result: str  # "stopped (SIGTERM)", "queued on lane gpu-a:0: not started", ...
    lane: str | None = None
    host: str | None = None  # the [[hosts]] entry (filled in by the orchestrator)


def stop_lanes(wd: Workdir, arms: Sequence[str], timeout: float) -> list[StopRow]:
    """Stop every live lane that holds a run of these arms: a stop request to the run it trains
    (armlab.runs.request_stop), SIGTERM to its runner (the run's supervisor: the ranks finish the
    step, checkpoint and exit), SIGKILL after `timeout`. A lane stops whole: its queued runs,
    of any arm, are listed as not started; the next launch / run starts them."""
    rows = []
    views = read_lanes(wd.root)
    for view in views:
        if not view.alive or not any(a in arms for a, _ in view.runs):
            continue
        files = LaneFiles(wd.root / LANES_DIR, view.host, view.lane)
        if view.current:  # the run's ranks (every node's) read it at their step's end: checkpoint, stop
            runs.request_stop(wd.run_dir(*view.current), "armlab stop")
        how = runs.stop_process(int(view.pid or -1), timeout)
        if read_lane_state(files).state == LaneState.RUNNING:  # SIGKILLed: say so for it
            write_lane_state(
                files, state=LaneState.STOPPED, ended=time.time(), error=f"stopped by armlab stop ({how})"
            )
        if view.current:
            arm, run = view.current
            rd = wd.run_dir(arm, run)
            if runs.read_state(rd).get("state") in runs.ACTIVE:
                runs.write_state(
                    rd, state=RunState.STOPPED, ended=time.time(), error=f"stopped by armlab stop ({how})"
                )
            rows.append(StopRow(arm, run, view.pid, f"stopped ({how})", view.id))
        for arm, run in view.runs:
            if (arm, run) == view.current:
                continue
            with contextlib.suppress(ArmlabError):
                if runs.read_state(wd.run_dir(arm, run)).get("state") == RunState.DONE:
                    continue
            rows.append(StopRow(arm, run, None, f"queued on lane {view.id}: not started", view.id))
    for view in views:  # after node 0's runner, which owns the run and its checkpoint
        _stop_followers(wd, view, arms, timeout)
    return rows


def _stop_followers(wd: Workdir, view: LaneView, arms: Sequence[str], timeout: float) -> None:
    """The lane's followers (its runners on nodes > 0) that live on this machine: SIGTERM (their
    ranks stop with the run's), SIGKILL after `timeout`."""
    if not any(a in arms for a, _ in view.runs):
        return
    base = LaneFiles(wd.root / LANES_DIR, view.host, view.lane)
    for state in sorted(base.dir.glob(f"{view.host}.lane{view.lane}.node*.state.json")):
        node = int(state.name.split(".node")[1].split(".")[0])
        files = base.follower(node)
        st = read_lane_state(files)
        if lane_alive(st):
            how = runs.stop_process(int(st.pid or -1), timeout)
            if read_lane_state(files).state == LaneState.RUNNING:
                write_lane_state(files, state=LaneState.STOPPED, ended=time.time(), error=f"stopped ({how})")
