"""What the orchestrator and a host's agent say to each other: one typed record per request and
per answer (armlab.records.Record: to_json / from_json), the same in process (this machine) and
as JSON over a shell (SSH, a Slurm login node)."""

from __future__ import annotations

from dataclasses import dataclass, field

from armlab.ops.lanes import LaneView, StopRow
from armlab.ops.schedule import Slot
from armlab.records import Record
from armlab.runs import RunState


# -- requests -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotsRequest(Record):
    """probe / start: these slots (runs placed on lanes by the schedule)."""

    slots: list[Slot]


@dataclass(frozen=True)
class FollowRequest(Record):
    """follow: on node `node_rank` (> 0) of runs across machines, a runner for each lane of these slots."""

    slots: list[Slot]
    node_rank: int


@dataclass(frozen=True)
class MirrorRequest(Record):
    arms: list[str]
    host: str | None = None  # the [[hosts]] entry whose lanes to include


@dataclass(frozen=True)
class StopRequest(Record):
    arms: list[str]
    timeout: float


@dataclass(frozen=True)
class LogsRequest(Record):
    arm: str
    run: str | None
    lines: int
    follow: bool


# -- answers --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunProbe(Record):
    """One run of the slots, as its host sees it."""

    arm: str
    run: str
    run_dir: str  # on the host
    state: str | None  # state.json's state; None: no run yet
    alive: bool  # live on the host (its supervisor's pid lives there)
    pid: int | None

    @property
    def pending(self) -> bool:
        """Still to train here: not done, and nobody trains it now."""
        return self.state != RunState.DONE and not self.alive


@dataclass(frozen=True)
class LaneProbe(Record):
    alive: bool  # a runner owns the lane
    pid: int | None  # that runner's
    starts: bool  # no runner, and a run of the lane is pending: `start` would start one
    port_busy: bool  # its fixed master port is taken on the host (only checked when it starts)


@dataclass(frozen=True)
class JobView(Record):
    """A run's job as a scheduler sees it (Slurm: squeue), joined with the run by `status`."""

    run: str
    arm: str
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETING, ... or "ENDED" once the scheduler forgot it
    reason: str | None = None  # why it is pending (Priority, Resources, Dependency, ...)
    nodes: str | None = None  # the node list it runs on
    link: int = 1  # which job of the run's chain (1: the first; a resumed run's next job: 2, ...)

    def describe(self) -> str:
        """`123 PENDING (Priority)`, `124 RUNNING on n[1-2], link 2`."""
        out = f"{self.job_id} {self.state}"
        if self.reason and self.reason != "None":
            out += f" ({self.reason})"
        if self.nodes and self.state == "RUNNING":
            out += f" on {self.nodes}"
        return out + (f", link {self.link}" if self.link > 1 else "")

    def short(self) -> str:
        """`123 PD Priority`, `124 R n[1-2] #2` (squeue's state codes)."""
        code = SQUEUE_CODES.get(self.state, self.state)
        out = f"{self.job_id} {code}"
        if self.reason and self.reason != "None":
            out += f" {self.reason}"
        if self.nodes and self.state == "RUNNING":
            out += f" {self.nodes}"
        return out + (f" #{self.link}" if self.link > 1 else "")


SQUEUE_CODES = {
    "PENDING": "PD", "RUNNING": "R", "COMPLETING": "CG", "COMPLETED": "CD", "CANCELLED": "CA", "FAILED": "F",
    "TIMEOUT": "TO", "PREEMPTED": "PR", "NODE_FAIL": "NF", "SUSPENDED": "S", "REQUEUED": "RQ",
}  # fmt: skip


@dataclass(frozen=True)
class HostProbe(Record):
    """The slots' runs on a host, its lanes' runners, its data and tokenizer (one round trip)."""

    hostname: str
    runs: dict[str, RunProbe]  # run name -> it
    lanes: dict[str, LaneProbe]  # lane id -> it
    data: dict[str, bool]  # arm -> its data is prepared there
    tokenizer: str | None  # the host's tokenizer fingerprint, if trained
    jobs: dict[str, JobView] = field(default_factory=dict)  # run -> its live job (schedulers)


@dataclass(frozen=True)
class LaneStarted(Record):
    lane: str
    action: str  # started | running (a runner was alive: it reads the new queue) | failed
    pid: int | None
    error: str | None = None  # its first run failed before training (a refused plan, say)
    failures: dict[str, str] = field(default_factory=dict)  # run -> error, from this runner


@dataclass(frozen=True)
class StartResult(Record):
    lanes: dict[str, LaneStarted]  # lane id -> what happened
    tokenizer: str | None
    jobs: dict[str, JobView] = field(default_factory=dict)  # run -> its job (schedulers)


@dataclass(frozen=True)
class MirroredRun(Record):
    """A run's small files (run.json, state.json, eval.json, tails of metrics and log)."""

    arm: str
    run: str
    run_dir: str
    files: dict[str, str]
    alive: bool


@dataclass(frozen=True)
class MirrorPayload(Record):
    runs: list[MirroredRun]
    lanes: list[LaneView]
    jobs: list[JobView] = field(default_factory=list)


@dataclass(frozen=True)
class StopResult(Record):
    rows: list[StopRow]
