"""The host side of every backend: what runs where the workdir is, behind one table of ops.

    probe   SlotsRequest   -> HostProbe      the slots' runs, lanes, data, tokenizer, busy ports
    start   SlotsRequest   -> StartResult    queue each lane, start the runners that are not alive
    mirror  MirrorRequest  -> MirrorPayload  small files of every run, and the lanes (for status)
    stop    StopRequest    -> StopResult     stop the lanes and live runs of some arms
    logs    LogsRequest    -> (a stream)     a run's train.log, replacing the process with `tail`

On this machine the orchestrator calls `call(op, exp, request)` in process; on another machine
(SSH, a Slurm login node) it runs `python -m armlab.ops.hosts.agent OP EXP_PATH` with the
request as JSON on stdin and reads the answer as the last line of stdout (armlab.ops.hosts.shell).
The experiment is the host's own (its workdir, no [[hosts]]): a plain local experiment.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.ops.hosts.messages import (
    FollowRequest,
    HostProbe,
    LaneProbe,
    LaneStarted,
    LogsRequest,
    MirroredRun,
    MirrorPayload,
    MirrorRequest,
    RunProbe,
    SlotsRequest,
    StartResult,
    StopRequest,
    StopResult,
)
from armlab.ops.lanes import (
    LaneFiles,
    StopRow,
    lane_alive,
    read_lane_state,
    read_lanes,
    read_queue,
    start_followers,
    start_lanes,
    stop_lanes,
)
from armlab.ops.schedule import Slot, group_lanes
from armlab.records import Record
from armlab.runs import (
    EVAL_JSON,
    METRICS_JSONL,
    RUN_JSON,
    STATE_JSON,
    TRAIN_LOG,
    is_live,
    read_state,
    stop_run,
)
from armlab.spec import Experiment, load_experiment
from armlab.workdir import freeze_spec, open_workdir, pid_alive, read_json, read_leases, release_lease

METRICS_TAIL = 1000  # metrics.jsonl lines mirrored (plus every val_bpb line)
LOG_TAIL = 200  # train.log lines mirrored


# -- probe --------------------------------------------------------------------------------------------
def port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def run_probe(run_dir: Path, arm: str, run: str) -> RunProbe:
    st = read_state(run_dir)
    return RunProbe(arm, run, str(run_dir), st.get("state"), is_live(st), st.get("pid"))


def _tokenizer(exp: Experiment) -> str | None:
    manifest = open_workdir(exp, create=False).tokenizer_dir / "manifest.json"
    return read_json(manifest).get("fingerprint") if manifest.exists() else None


def probe(exp: Experiment, req: SlotsRequest) -> HostProbe:
    wd = open_workdir(exp, create=False)
    runs = {s.run: run_probe(wd.run_dir(s.arm, s.run), s.arm, s.run) for s in req.slots}
    lanes = {}
    for lane in group_lanes(req.slots):
        st = read_lane_state(LaneFiles.of(wd.root, lane[0]))
        alive = lane_alive(st)
        starts = not alive and any(runs[s.run].pending for s in lane)
        port = lane[0].port
        lanes[lane[0].lane_id] = LaneProbe(
            alive, st.pid if alive else None, starts, bool(starts and port is not None and port_busy(port))
        )
    data = {a: (wd.data_dir(a) / "manifest.json").exists() for a in sorted({s.arm for s in req.slots})}
    return HostProbe(socket.gethostname(), runs, lanes, data, _tokenizer(exp))


# -- start --------------------------------------------------------------------------------------------
def merged_queue(files: LaneFiles, slots: list[Slot]) -> list[Slot]:
    """The lane's queue: these slots, plus those of its queue already there (another --seed)."""
    try:
        _, old = read_queue(files)
    except (FileNotFoundError, ArmlabError):
        old = []
    new = {s.run for s in slots}
    kept = [s for s in old if s.run not in new and (s.host, s.lane) == (slots[0].host, slots[0].lane)]
    return sorted([*kept, *slots], key=lambda s: s.position)


def start(exp: Experiment, req: SlotsRequest, detach: bool = True) -> StartResult:
    """Queue every lane of the slots and start a runner for each that has none alive."""
    wd = open_workdir(exp)
    lanes = [merged_queue(LaneFiles.of(wd.root, lane[0]), lane) for lane in group_lanes(req.slots)]
    starts = start_lanes(wd, exp, lanes, detach=detach)
    freeze_spec(wd, exp)
    out = {}
    for lane, s in zip(lanes, starts, strict=True):
        st = read_lane_state(LaneFiles.of(wd.root, lane[0]))
        mine = st.pid == s.pid  # the failures of this lane's runner (not of an older one)
        out[s.lane] = LaneStarted(s.lane, s.action, s.pid, s.error, dict(st.failures) if mine else {})
    return StartResult(out, _tokenizer(exp))


def follow(exp: Experiment, req: FollowRequest) -> StartResult:
    """On node `req.node_rank` of runs across machines: a follower runner for each lane (node 0's
    runner leads; see armlab.ops.lane_runner.follow_lane)."""
    starts = start_followers(open_workdir(exp, create=False), group_lanes(req.slots), req.node_rank)
    return StartResult({s.lane: LaneStarted(s.lane, s.action, s.pid) for s in starts}, None)


# -- mirror -------------------------------------------------------------------------------------------
def run_dirs(exp: Experiment, arms: list[str]) -> list[Path]:
    wd = open_workdir(exp, create=False)
    return sorted(p.parent for a in arms for p in wd.runs_dir(a).glob(f"*/{STATE_JSON}"))


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size, block, data = f.tell(), 1 << 16, b""
            while size > 0 and data.count(b"\n") <= n:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-n:]


def mirrored_run(rd: Path) -> MirroredRun:
    files: dict[str, str] = {}
    for name in (RUN_JSON, STATE_JSON, EVAL_JSON):
        with contextlib.suppress(FileNotFoundError):
            files[name] = (rd / name).read_text()
    metrics = rd / METRICS_JSONL
    if metrics.exists():
        with open(metrics, errors="replace") as f:
            lines = [ln.rstrip("\n") for ln in f if ln.strip()]
        tail = lines[-METRICS_TAIL:]
        evals = [ln for ln in lines[:-METRICS_TAIL] if '"val_bpb"' in ln]
        files[METRICS_JSONL] = "\n".join(evals + tail) + "\n" if lines else ""
    log = _tail_lines(rd / TRAIN_LOG, LOG_TAIL)
    if log:
        files[TRAIN_LOG] = "\n".join(log) + "\n"
    return MirroredRun(rd.parent.parent.name, rd.name, str(rd), files, is_live(read_state(rd)))


def mirror(exp: Experiment, req: MirrorRequest) -> MirrorPayload:
    """Small files of every run of these arms, and the lanes of host entry `req.host` as this
    machine sees them (runner alive or not)."""
    lanes = [v for v in read_lanes(open_workdir(exp, create=False).root) if v.host == req.host]
    return MirrorPayload([mirrored_run(rd) for rd in run_dirs(exp, req.arms)], lanes)


# -- stop ---------------------------------------------------------------------------------------------
def stop_timeout() -> float:
    """How long a stop waits before SIGKILL: the trainer's grace to checkpoint (armlab.train.stop
    GRACE_S; a d26 checkpoint is ~10 GB), plus a minute."""
    from armlab.train.stop import GRACE_S

    return GRACE_S + 60.0


def stop(exp: Experiment, req: StopRequest) -> StopResult:
    """Stop this machine's lanes and live runs of these arms: first every live lane holding one of
    their runs (armlab.ops.lanes.stop_lanes: the lane's run stops, its queued runs do not start),
    then any other live run (`armlab.runs.stop_run`: SIGTERM the supervisor, wait, SIGKILL after
    the timeout). After a SIGKILL the leases the dead process held are released here."""
    wd = open_workdir(exp, create=False)
    rows = stop_lanes(wd, req.arms, req.timeout)
    handled = {(r.arm, r.run) for r in rows}
    for rd in run_dirs(exp, req.arms):
        arm, run = rd.parent.parent.name, rd.name
        if (arm, run) in handled:
            continue
        stopped = stop_run(rd, req.timeout)
        if stopped is not None:
            rows.append(StopRow(arm, run, stopped.pid, stopped.result))
    for r in rows:
        if r.pid is None:
            continue
        for lease in read_leases(wd.data_dir(r.arm)):  # a SIGKILLed holder could not release its own
            if lease.local and lease.pid == r.pid and not pid_alive(lease.pid):
                release_lease(wd.data_dir(r.arm), lease)
    return StopResult([with_restart(wd.run_dir(r.arm, r.run), r) for r in rows])


def with_restart(run_dir: Path, row: StopRow) -> StopRow:
    """A stop says where a restart resumes: the checkpoint the stop saved (state.json's
    `resume_step`), else the run's last one; with none, that it begins at step 0."""
    if not row.result.startswith(("stopped", "cancelled")):
        return row
    st = read_state(run_dir)
    step = st.get("resume_step") if st.get("state") == "stopped" else None
    if step is None:
        step = _last_checkpoint(run_dir)
    tail = f"resumes from step {step}" if step else "no checkpoint yet: a restart begins at step 0"
    return dataclasses.replace(row, result=f"{row.result}; {tail}")


def _last_checkpoint(run_dir: Path) -> int | None:
    from armlab.runs import load_run
    from armlab.train.engines import get_engine

    try:
        steps = get_engine(load_run(run_dir).engine).checkpoint_steps(run_dir)
    except ArmlabError:  # no run.json yet: nothing trained
        return None
    return steps[-1] if steps else None


# -- logs ---------------------------------------------------------------------------------------------
def log_path(exp: Experiment, arm: str, run: str | None) -> Path:
    wd = open_workdir(exp, create=False)
    if run is None:
        found = sorted(wd.runs_dir(arm).glob(f"*/{TRAIN_LOG}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ArmlabError(f"arm {arm!r} has no run with a train.log yet in {wd.runs_dir(arm)}")
        return found[-1]
    path = wd.run_dir(arm, run) / TRAIN_LOG
    if not path.exists():
        raise ArmlabError(f"{path}: no such log (is the run name right? it is <arm>-s<seed>)")
    return path


def tail_argv(path: Path, lines: int, follow: bool) -> list[str]:
    return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]


def logs(exp: Experiment, req: LogsRequest) -> None:
    """Replace this process (the agent's, on the host) with `tail`: Ctrl-C over SSH ends it cleanly."""
    sys.stdout.flush()
    os.execvp("tail", tail_argv(log_path(exp, req.arm, req.run), req.lines, req.follow))


# -- the table ----------------------------------------------------------------------------------------
Op = tuple[type[Record], Callable[[Experiment, Any], Record | None], type[Record] | None]  # request, fn, answer
OPS: dict[str, Op] = {
    "probe": (SlotsRequest, probe, HostProbe),
    "start": (SlotsRequest, start, StartResult),
    "follow": (FollowRequest, follow, StartResult),
    "mirror": (MirrorRequest, mirror, MirrorPayload),
    "stop": (StopRequest, stop, StopResult),
    "logs": (LogsRequest, logs, None),  # replaces the process with `tail`: no answer
}
# A backend's own host-side ops, as "<backend>.<op>": its module's OPS table (same shape).
BACKEND_OPS = {"slurm": "armlab.ops.hosts.slurm_jobs"}


def lookup(op: str) -> Op:
    backend, dot, name = op.rpartition(".")
    try:
        table = importlib.import_module(BACKEND_OPS[backend]).OPS if dot else OPS
        return table[name]
    except KeyError:
        raise ArmlabError(f"unknown agent op {op!r}; is armlab the same version on both sides?") from None


def call(op: str, exp: Experiment, request: Record) -> Record | None:
    """Run one op in this process."""
    kind, fn, _ = lookup(op)
    if not isinstance(request, kind):
        raise TypeError(f"agent op {op}: expected {kind.__name__}, got {type(request).__name__}")
    return fn(exp, request)


def main(argv: list[str]) -> int:
    """`python -m armlab.ops.hosts.agent OP EXP_PATH` (the request as JSON on stdin): the answer
    as one JSON line on stdout; a refusal as one line on stderr, exit 2."""
    try:
        op, exp_path = argv
        kind = lookup(op)[0]
        request = kind.from_json(json.loads(sys.stdin.read() or "{}"), f"agent {op} request")
        answer = call(op, load_experiment(exp_path), request)
    except ArmlabError as e:
        print(f"armlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    if answer is not None:
        print(json.dumps(answer.to_json()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
