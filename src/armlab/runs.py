"""A run dir, in one place: its file names, its states, whether it is live, and how it is stopped.

    arms/<arm>/runs/<run>/
        run.json       what the run is (written once, before it starts): spec, fingerprints, config
        plan.json      the per-run plan the supervisor and its ranks read (armlab.train.plan.RunPlan)
        state.json     where it is (`StateRecord`): state, supervisor pid and host, step, phase,
                       resume_step, and on a done run `armlab evaluate`'s progress while it scores
                       the run (`Evaluating`); rewritten atomically
        metrics.jsonl  one JSON object a line (`MetricsRecord`), each with a `step`, appended by
                       one writer (`MetricsLog`) while it runs
        train.log      everything the ranks printed, tee'd by the supervisor (train.node<K>.log on
                       node K > 0 of a multi-node run; train.<n>.log: the logs of an earlier try
                       that restarted from step 0, kept)
        stop-request   why a stop was asked for (`request_stop`): the ranks read it at a step's end
        eval.json      `armlab evaluate`'s result
        .rank-errors/  one file per rank that died with an exception (its one-line error)
        checkpoints/   the built-in engine's checkpoints (armlab.train.checkpoint)

`state.json` is written by the supervisor before it starts the ranks and after they exit, and by
the engine while they run (the built-in trainer's rank 0, which also writes the final `stopped` /
`diverged` it ends with); the two never overlap. Once the run is done, `armlab evaluate` writes only
its phase and progress there, and clears them when it ends. On a multi-node run only node 0 writes it. A run is
*live* when its state is active (starting, running) and its supervisor's pid lives on this host;
a zombie counts as dead. `armlab status` adds what only an observer sees: STALLED (live, or on
another host, but nothing logged for a while), dead (active state, pid gone), queued (no run dir
yet) and unreadable (a torn run.json / state.json).

Readers are tolerant where a live writer may be mid-line (metrics.jsonl: a torn line is skipped
and counted, so a report can refuse a damaged file) and strict where a file should be whole
(run.json, written atomically): a torn run.json is an error naming the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.records import Record
from armlab.spec import fingerprint_diff
from armlab.workdir import atomic_write_json, atomic_write_text, pid_alive, read_json

RUN_JSON = "run.json"
PLAN_JSON = "plan.json"
STATE_JSON = "state.json"
METRICS_JSONL = "metrics.jsonl"
TRAIN_LOG = "train.log"
EVAL_JSON = "eval.json"
RANK_ERRORS = ".rank-errors"
CHECKPOINTS = "checkpoints"
STOP_REQUEST = "stop-request"

PR_SET_PDEATHSIG = 1


class RunState(StrEnum):
    """Every state `armlab status` shows. The first six are written to state.json; the last four
    only an observer derives (a StrEnum, so `state == "done"` holds for the written strings).
    Final: done, failed, diverged (a non-finite loss; retrain with other settings); stopped is
    resumable (`StateRecord.resume_step`)."""

    STARTING = "starting"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"
    DIVERGED = "diverged"  # the loss became NaN/inf: training stopped there, no NaN checkpoint kept
    QUEUED = "queued"  # an arm x seed of the experiment with no run dir yet
    STALLED = "STALLED"  # live (or on another host) but nothing logged for stall_after_s
    DEAD = "dead"  # state.json says active, but its pid is gone from this host
    UNREADABLE = "unreadable"  # a torn run.json or state.json


ACTIVE = frozenset({RunState.STARTING, RunState.RUNNING})  # a supervisor owns the run


# -- state.json -------------------------------------------------------------------------------------
class Phase(StrEnum):
    """What the ranks are doing at `StateRecord.step` (status shows "eval at step N")."""

    TRAIN = "train"
    EVAL = "eval"
    SAVE = "save"


@dataclass(frozen=True)
class Evaluating(Record):
    """`armlab evaluate` at work on a finished run (state.json: phase "eval" and this, the run still
    done): checkpoint `index` of `of`, at `step`, by `pid` on `host` (an evaluator killed with
    SIGKILL leaves it behind; its pid tells status it is stale)."""

    index: int
    of: int
    step: int
    pid: int
    host: str


@dataclass(frozen=True)
class StateRecord(Record):
    """state.json, typed. `state` is kept as written (a state a newer armlab writes reads back as
    itself; `observed_state` calls it unreadable); fields this armlab does not know are kept in
    `extra` and written back unchanged."""

    state: str = RunState.STARTING.value
    pid: int | None = None
    host: str | None = None
    started: float | None = None
    ended: float | None = None
    error: str | None = None  # one line: why it failed, stopped or diverged
    step: int = 0
    num_iterations: int | None = None
    phase: str | None = None  # Phase while the ranks run, or "eval" while `armlab evaluate` scores it; else None
    evaluating: Evaluating | None = None  # with phase "eval" on a done run: which checkpoint, by whom
    resume_step: int | None = None  # stopped: the checkpoint a restart continues from (None: step 0)
    stop_reason: str | None = None  # stopped: the signal (SIGTERM, SIGUSR1, ...) or "armlab stop"
    unparsed_lines: int | None = None  # nanochat: output lines that looked like metrics but did not parse
    updated: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        return {**out.pop("extra"), **out}

    @classmethod
    def from_json(cls, data: Any, source: str = STATE_JSON) -> StateRecord:
        if not isinstance(data, Mapping):
            raise ArmlabError(f"{source}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rec = super().from_json({k: v for k, v in data.items() if k in names}, source)
        return dataclasses.replace(rec, extra={k: v for k, v in data.items() if k not in names})


def read_run_state(run_dir: Path) -> StateRecord | None:
    """state.json as a `StateRecord` (None before the first write); a torn one is an ArmlabError
    naming it."""
    path = Path(run_dir) / STATE_JSON
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    return StateRecord.from_json(data, str(path))


def read_state(run_dir: Path) -> dict[str, Any]:
    """state.json as plain data ({} before the first write): `read_run_state(...).to_json()`."""
    rec = read_run_state(run_dir)
    return rec.to_json() if rec is not None else {}


def write_state(run_dir: Path, **fields: Any) -> dict[str, Any]:
    """Update state.json with `fields` (StateRecord's names: another name is a TypeError) and
    `updated`, keeping the other fields."""
    old = read_run_state(run_dir) or StateRecord(host=socket.gethostname())
    values = {k: v.value if isinstance(v, StrEnum) else v for k, v in fields.items()}
    rec = dataclasses.replace(old, **values, updated=time.time())
    atomic_write_json(Path(run_dir) / STATE_JSON, rec.to_json())
    return rec.to_json()


def owner_alive(state: Mapping[str, Any] | None) -> bool | None:
    """Whether the pid in state.json lives: True / False for a pid of this host (a zombie is dead),
    None when the run belongs to another host or names no pid (cannot tell from here)."""
    state = state or {}
    pid, host = state.get("pid"), state.get("host")
    if not pid or host not in (None, socket.gethostname()):
        return None
    return pid_alive(int(pid))


def is_live(state: Mapping[str, Any] | None) -> bool:
    """The one definition: an active state whose supervisor pid lives on this host."""
    return bool(state) and state.get("state") in ACTIVE and owner_alive(state) is True


def observed_state(
    state: Mapping[str, Any] | None, last_activity: float | None, stall_after_s: float, now: float
) -> RunState:
    """What `status` shows for a run dir: the written state, or dead / STALLED for an active one."""
    try:
        st = RunState((state or {}).get("state") or RunState.STARTING)
    except ValueError:  # a state this armlab does not know (a newer writer, a hand edit)
        return RunState.UNREADABLE
    if st not in ACTIVE:
        return st
    if owner_alive(state) is False:
        return RunState.DEAD
    if last_activity is not None and now - last_activity > stall_after_s:
        return RunState.STALLED
    return st


def last_activity(run_dir: Path, state: Mapping[str, Any] | None) -> float | None:
    """When the run last logged: newest of metrics.jsonl / train.log, else when it started."""
    times = [
        p.stat().st_mtime for p in (Path(run_dir) / METRICS_JSONL, Path(run_dir) / TRAIN_LOG) if p.exists()
    ]
    if times:
        return max(times)
    started = (state or {}).get("started")
    return float(started) if started else None


# -- metrics.jsonl ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricsRecord(Record):
    """One line of metrics.jsonl. A training step has `train_loss` and the speed fields (written
    even when None: `mfu` is null on CPU), an evaluation `val_bpb` or `core`; every record has the
    step (optimiser steps done), the tokens trained on and `time` (seconds of training steps so
    far). Other fields that are None are left out, so `"train_loss" in line` tells a training record."""

    TRAIN_FIELDS = ("lr_mult", "dt", "tok_per_s", "mfu", "epoch")

    step: int
    tokens: int
    time: float
    train_loss: float | None = None
    lr_mult: float | None = None
    dt: float | None = None
    tok_per_s: float | None = None
    mfu: float | None = None
    epoch: float | None = None
    val_bpb: float | None = None
    core: float | None = None

    def to_json(self) -> dict[str, Any]:
        keep = self.TRAIN_FIELDS if self.train_loss is not None else ()
        return {k: v for k, v in super().to_json().items() if v is not None or k in keep}


class MetricsLog:
    """The one writer of a run's metrics.jsonl: each record is appended as one line and flushed at
    once (status and the engine's watchers read the file while it grows)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / METRICS_JSONL

    def append(self, record: MetricsRecord) -> None:
        line = json.dumps(record.to_json(), allow_nan=False) + "\n"  # strict JSON: a NaN is no metric
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


@dataclass(frozen=True)
class Metrics:
    """metrics.jsonl as read: its records, and the lines that were not one (torn or damaged)."""

    records: list[dict[str, Any]]
    torn: list[int] = field(default_factory=list)  # 1-based numbers of lines that are no record
    unterminated: bool = False  # the last line has no newline: a writer mid-line, or a cut copy

    @property
    def last_step(self) -> int | None:
        return max((int(r["step"]) for r in self.records), default=None)


def read_metrics(run_dir: Path) -> Metrics:
    """Every record of `<run_dir>/metrics.jsonl`: a JSON object with an integer `step`.

    A line that is not one (half a line from a kill or a live writer, bytes from a damaged copy) is
    skipped and its number kept in `torn`, so a report can refuse the run instead of silently
    taking an earlier value as the final one. Undecodable bytes are replaced, never fatal.
    """
    try:
        text = (Path(run_dir) / METRICS_JSONL).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return Metrics([])
    lines = text.split("\n")
    unterminated = lines[-1] != ""
    if not unterminated:
        lines.pop()
    records, torn = [], []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool):
            records.append(rec)
        else:
            torn.append(i)
    return Metrics(records, torn, unterminated)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (the checkpoint a resume starts from), so the
    file reads as one uninterrupted run; torn lines go too."""
    kept = [m for m in read_metrics(run_dir).records if m["step"] <= step]
    atomic_write_text(Path(run_dir) / METRICS_JSONL, "".join(json.dumps(m) + "\n" for m in kept))


# -- rank errors ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankError:
    """What a rank that died of an exception left for its supervisor."""

    rank: int
    kind: str  # "bad_input" (an ArmlabError: exit 2) or "error"
    error: str  # one line
    time: float
    traceback: str = ""


def rank_error_file(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / RANK_ERRORS / f"rank{rank}.json"


def write_rank_error(run_dir: Path, err: RankError) -> None:
    atomic_write_json(rank_error_file(run_dir, err.rank), asdict(err))


def read_rank_errors(run_dir: Path) -> list[RankError]:
    """Errors the ranks recorded before dying, earliest first (the first is usually the cause)."""
    errors = []
    for p in sorted((Path(run_dir) / RANK_ERRORS).glob("rank*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            d = json.loads(p.read_text())
            errors.append(RankError(int(d["rank"]), str(d["kind"]), str(d["error"]), float(d["time"]),
                                    str(d.get("traceback", ""))))  # fmt: skip
    return sorted(errors, key=lambda e: e.time)


def clear_rank_errors(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / RANK_ERRORS, ignore_errors=True)


# -- a run dir, read whole (status, compare, evaluate) ----------------------------------------------------
def _optional_json(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


@dataclass
class RunRecord:
    dir: Path
    info: dict[str, Any]  # run.json
    state: dict[str, Any] | None  # state.json
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl records
    eval: dict[str, Any] | None = None  # eval.json
    torn_metrics: list[int] = field(default_factory=list)  # metrics.jsonl lines that are no record

    @property
    def arm(self) -> str:
        return str(self.info.get("arm", self.dir.parent.parent.name))

    @property
    def run(self) -> str:
        return str(self.info.get("run", self.dir.name))

    @property
    def seed(self) -> int:
        return int(self.info.get("seed", 0))

    @property
    def state_name(self) -> str:
        return str((self.state or {}).get("state", RunState.STARTING))

    @property
    def live(self) -> bool:
        return is_live(self.state)

    @property
    def engine(self) -> str:
        """The engine that trained the run (runs from before engines were recorded: builtin)."""
        return str((self.info.get("engine") or {}).get("engine", "builtin"))

    @property
    def engine_comparable(self) -> dict[str, Any]:
        """What the engine resolved at run time that every compared run must share."""
        return dict(self.info.get("engine_comparable") or {})

    def spec_differences(self, comparability: Mapping[str, Any]) -> list[str] | None:
        """Dotted spec keys where this run was trained differently from `comparability` (an
        experiment's `comparability()`); None when run.json has no record to compare."""
        got = self.info.get("comparability")
        if got is None:
            return None
        return fingerprint_diff(json.loads(json.dumps(dict(comparability), default=str)), got)

    @property
    def train_lines(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if "train_loss" in m]

    @property
    def eval_lines(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("val_bpb") is not None]

    @property
    def final_val_bpb(self) -> float | None:
        if self.eval and self.eval.get("val_bpb") is not None:
            return float(self.eval["val_bpb"])
        lines = self.eval_lines
        return float(lines[-1]["val_bpb"]) if lines else None

    @property
    def core(self) -> float | None:
        return None if not self.eval or self.eval.get("core") is None else float(self.eval["core"])

    @property
    def tokens(self) -> int | None:
        last = self.metrics[-1] if self.metrics else None
        return int(last["tokens"]) if last and "tokens" in last else None

    @property
    def epoch(self) -> float | None:
        lines = [m for m in self.train_lines if m.get("epoch") is not None]
        return float(lines[-1]["epoch"]) if lines else None

    @property
    def train_time_s(self) -> float | None:
        """Wall time from start to end (state.json), else the last metrics line's elapsed time."""
        st = self.state or {}
        if st.get("started") and st.get("ended"):
            return float(st["ended"]) - float(st["started"])
        return float(self.metrics[-1]["time"]) if self.metrics and "time" in self.metrics[-1] else None


def load_run(run_dir: Path) -> RunRecord:
    """Read a run dir; one without run.json, or with a torn run.json / state.json, is an
    ArmlabError naming the file."""
    run_dir = Path(run_dir)
    try:
        info = read_json(run_dir / RUN_JSON)
    except FileNotFoundError:
        raise ArmlabError(f"{run_dir}: not a run dir (no {RUN_JSON})") from None
    if not isinstance(info, dict):
        raise ArmlabError(f"{run_dir / RUN_JSON}: expected a JSON object")
    metrics = read_metrics(run_dir)
    return RunRecord(
        dir=run_dir,
        info=info,
        state=_optional_json(run_dir / STATE_JSON),
        metrics=metrics.records,
        eval=_optional_json(run_dir / EVAL_JSON),
        torn_metrics=metrics.torn,
    )


def engine_differences(records: list[RunRecord]) -> list[str]:
    """Runs trained by another engine build than the others (e.g. another nanochat commit or a
    patched checkout), each as '<run dir> (differs from ... in engine.<key> (x vs y))'; [] when
    all agree. The odd ones out are the minority: with two runs on commit A and one on B, the B
    run is named, not the other two. With no majority (two builds, as many runs each) every run
    of the other builds is named against the build of the first run, and the message says so."""
    if not records:
        return []
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        groups.setdefault(json.dumps({"name": r.engine, **r.engine_comparable}, sort_keys=True, default=str), []).append(r)
    if len(groups) == 1:
        return []
    sizes = sorted((len(g) for g in groups.values()), reverse=True)
    majority = sizes[0] > sizes[1]
    ref = max(groups.values(), key=len) if majority else groups[next(iter(groups))]
    want = {"name": ref[0].engine, **ref[0].engine_comparable}
    names = ", ".join(r.run for r in ref)
    against = f"the other {len(ref)} runs ({names})" if majority and len(ref) > 1 else ref[0].run
    tie = "" if majority else " (no build has most runs: which is right is yours to say)"
    out = []
    for g in groups.values():
        if g is ref:
            continue
        for r in g:
            got = {"name": r.engine, **r.engine_comparable}
            named = ", ".join(f"engine.{k}{_values(want, got, k)}" for k in fingerprint_diff(want, got))
            out.append(f"{r.dir} (differs from {against} in {named}{tie})")
    return out


def _values(a: Mapping[str, Any], b: Mapping[str, Any], dotted: str) -> str:
    """` (x vs y)` for a differing scalar (a commit, an engine name), '' for lists and tables."""
    missing = object()
    va: Any = a
    vb: Any = b
    for part in dotted.split("."):
        va = va.get(part, missing) if isinstance(va, Mapping) else missing
        vb = vb.get(part, missing) if isinstance(vb, Mapping) else missing
    if isinstance(va, Mapping | list) or isinstance(vb, Mapping | list):
        return ""
    return f" ({'none' if va is missing else va} vs {'none' if vb is missing else vb})"


# -- processes: stop a run, and never outlive a supervisor -----------------------------------------------
def wait_dead(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` s for `pid` to exit (or turn zombie); True once it has."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.2)
    return not pid_alive(pid)


def stop_process(pid: int, timeout: float) -> str:
    """SIGTERM `pid` (a supervisor stops its ranks and releases its lease on it), wait `timeout` s,
    then SIGKILL its whole process group; returns how it went, for the user."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if wait_dead(pid, timeout):
        return "SIGTERM"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    wait_dead(pid, 10)
    return f"SIGKILL after {timeout:.0f}s"


@dataclass(frozen=True)
class Stopped:
    pid: int | None
    result: str  # "stopped (SIGTERM)", "stopped (already dead)", "runs on <host>, not here"


def request_stop(run_dir: Path, reason: str) -> None:
    """Ask a run to stop the way a signal does (finish the step, checkpoint, exit resumable), saying
    why: the supervisor and the ranks read `stop-request` (the ranks at the end of each step), so
    the request also reaches ranks that no signal reaches. `stop_run` writes it before its SIGTERM."""
    atomic_write_text(Path(run_dir) / STOP_REQUEST, reason.strip() + "\n")


def read_stop_request(run_dir: Path) -> str | None:
    """The reason of a pending stop request, None when there is none."""
    try:
        return (Path(run_dir) / STOP_REQUEST).read_text().strip() or "stop requested"
    except (FileNotFoundError, NotADirectoryError):
        return None


def clear_stop_request(run_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / STOP_REQUEST).unlink()


def stop_run(run_dir: Path, timeout: float) -> Stopped | None:
    """Stop a run of this host (None when it is not active): a stop request ("armlab stop"), then
    SIGTERM to its supervisor, which has its ranks checkpoint and exit; SIGKILL after `timeout`.
    After a SIGKILL, or when its pid was already gone, state.json still says active: it is set to
    stopped here."""
    st = read_state(run_dir)
    if st.get("state") not in ACTIVE:
        return None
    pid = st.get("pid")
    if st.get("host") not in (None, socket.gethostname()):
        return Stopped(pid, f"runs on {st.get('host')}, not here")
    alive = owner_alive(st)
    if alive:
        request_stop(run_dir, "armlab stop")
    how = stop_process(int(pid), timeout) if alive else "already dead"
    if read_state(run_dir).get("state") in ACTIVE:
        write_state(
            run_dir, state=RunState.STOPPED, ended=time.time(), error=f"stopped by armlab stop ({how})",
            stop_reason="armlab stop", phase=None,
        )  # fmt: skip
    return Stopped(pid, f"stopped ({how})")


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process dies (no orphaned ranks after a kill -9 of the
    supervisor). Call it first thing in a child (or as a Popen preexec_fn)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
