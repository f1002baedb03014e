"""`AgentHost`: the part of every backend that is the host-side agent (armlab.ops.hosts.agent),
reached in this process or through a shell. A backend says how to reach it (`agent`) and
overrides what it does differently (doctor, prepare; Slurm: start, stop, logs)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from armlab.errors import ArmlabError
from armlab.ops.hosts.messages import (
    HostProbe,
    LogsRequest,
    MirrorPayload,
    MirrorRequest,
    SlotsRequest,
    StartResult,
    StopRequest,
    StopResult,
)
from armlab.ops.lanes import StopRow
from armlab.ops.schedule import Slot
from armlab.spec import Experiment, HostSpec

START_TIMEOUT_S = 900  # start waits for each new runner's first run (armlab.ops.lanes.START_WAIT_S)


class AgentHost:
    OPS_PREFIX = ""  # a backend with its own host-side ops names them "<backend>." (agent.BACKEND_OPS)

    def __init__(self, exp: Experiment, spec: HostSpec) -> None:
        self.exp, self.spec = exp, spec

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def agent(self) -> Any:
        """A LocalAgent or ShellAgent (armlab.ops.hosts.shell)."""
        raise NotImplementedError

    def check(self, slots: list[Slot]) -> None:
        return None

    def probe(self, slots: list[Slot]) -> HostProbe:
        return cast(HostProbe, self.agent.call(self.OPS_PREFIX + "probe", SlotsRequest(slots)))

    def start(self, slots: list[Slot]) -> StartResult:
        return cast(StartResult, self.agent.call("start", SlotsRequest(slots), timeout=START_TIMEOUT_S))

    def mirror(self) -> MirrorPayload:
        req = MirrorRequest(list(self.spec.arms), self.name)
        return cast(MirrorPayload, self.agent.call(self.OPS_PREFIX + "mirror", req, timeout=120))

    def stop(self, arms: list[str], timeout: float) -> list[StopRow]:
        req = StopRequest(arms, timeout)
        out = cast(StopResult, self.agent.call(self.OPS_PREFIX + "stop", req, timeout=timeout + 120))
        return [dataclasses.replace(r, host=self.name) for r in out.rows]

    def logs(self, arm: str, run: str | None, lines: int, follow: bool) -> int:
        rc = self.agent.stream(self.OPS_PREFIX + "logs", LogsRequest(arm, run, lines, follow))
        if rc == 2:
            raise ArmlabError(f"host {self.name!r}: no log for arm {arm!r} (see the message above)")
        return rc
