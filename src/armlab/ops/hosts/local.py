"""This machine as a host: lanes here, with the agent (armlab.ops.hosts.agent) in this process.

Detached (the default), `start` is what it is on every backend: queue the lanes, start a
runner for each, return. Attached (`armlab run`), `start` trains the lanes and returns when they
end: one lane in this very process (the ranks' output on the terminal), several side by side,
one runner process each (children of this one: they die with it), with a line here when a lane
starts a run. A signal (Ctrl-C, SIGTERM) stops every lane, each stopping its run resumably. A
runner that dies (kill -9) is said as such: its lane's run is named, with how to resume it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from armlab.errors import ArmlabError
from armlab.ops.doctor import DoctorReport, run_doctor
from armlab.ops.hosts.base import AgentHost
from armlab.ops.hosts.messages import LaneStarted, StartResult
from armlab.ops.hosts.shell import LocalAgent
from armlab.ops.lane_runner import LaneStopped, run_lane, stop_on_signals
from armlab.ops.lanes import (
    LaneFiles,
    LaneState,
    LaneStatus,
    queue_lane,
    read_lane_state,
    read_lanes,
    start_lanes,
)
from armlab.ops.schedule import Slot, group_lanes, local_host
from armlab.progress import console
from armlab.runs import stop_process
from armlab.spec import Experiment, HostSpec
from armlab.workdir import Workdir, open_workdir


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def this_machine(
    exp: Experiment,
    arms: list[str],
    device: str | None = None,
    num_gpus: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
) -> HostSpec:
    """This machine as one host entry ("local"): runs of `num_gpus` GPUs each (default: all
    visible), as many side by side as fit; on CPU, runs of `nproc` processes, `runs_at_once`
    side by side (armlab.ops.schedule.local_host)."""
    import torch

    if device not in (None, "cpu", "cuda"):
        raise ArmlabError(f"--device {device!r}: use cpu or cuda")
    device = device or ("cuda" if num_gpus is not None or torch.cuda.is_available() else "cpu")
    visible = torch.cuda.device_count() if device == "cuda" else 0
    return local_host(exp, arms, device=device, visible_gpus=visible, gpus_per_run=num_gpus, nproc=nproc,
                      runs_at_once=runs_at_once)  # fmt: skip


class LocalHost(AgentHost):
    def __init__(self, exp: Experiment, spec: HostSpec, attach: bool = False) -> None:
        super().__init__(exp, spec)
        self._agent = LocalAgent(exp)
        self.attach = attach

    @property
    def agent(self) -> LocalAgent:
        return self._agent

    @property
    def local_workdir(self) -> Path:
        return self.exp.workdir_path

    def machine(self) -> str:
        return "localhost"

    def doctor(self, *, device: str | None, expect_data: bool, extra: tuple[str, ...] = ()) -> DoctorReport:
        return run_doctor(self.exp, arms=list(self.spec.arms), device=device or self.spec.device,
                          nproc=self.spec.nproc, expect_data=expect_data, bundle=False)  # fmt: skip

    def prepare(self, arms: list[str], mode: str) -> None:
        from armlab.data.prepare import prepare
        from armlab.tokenizer import train_experiment_tokenizer

        if mode == "prepare":
            prepare(self.exp, arms=arms)
            train_experiment_tokenizer(self.exp)

    def start(self, slots: list[Slot]) -> StartResult:
        """Detached: start the lanes' runners. Attached: train every lane of `slots` to its end
        (see the module docstring); a stop raises LaneStopped once every lane stopped its run."""
        if not self.attach:
            return super().start(slots)
        wd = open_workdir(self.exp, create=False)
        lanes = group_lanes(slots)
        if len(lanes) == 1:
            files = queue_lane(wd, self.exp, lanes[0])
            return StartResult({files.id: _ended(files, run_lane(files.queue, echo=True))}, None)
        return StartResult(self._side_by_side(wd, lanes), None)

    def _side_by_side(self, wd: Workdir, lanes: list[list[Slot]]) -> dict[str, LaneStarted]:
        """Each lane in its own runner process, a line here when a lane starts a run."""
        starts = start_lanes(wd, self.exp, lanes, detach=False, wait_s=0)
        procs = {s.lane: s.proc for s in starts if s.proc is not None}
        shown: dict[str, tuple[str, str] | None] = {}
        try:
            with stop_on_signals():
                while any(p.poll() is None for p in procs.values()):
                    for view in read_lanes(wd.root):
                        if view.id in procs and view.current and shown.get(view.id) != view.current:
                            console.print(f"run: lane {view.id} training {view.current[1]}")
                        shown[view.id] = view.current
                    time.sleep(1)
        except (LaneStopped, KeyboardInterrupt):
            for p in procs.values():
                if p.poll() is None:
                    stop_process(p.pid, 60)  # SIGTERM (Ctrl-C sent them SIGINT already), SIGKILL after 60 s
                p.wait()
            raise LaneStopped("signal") from None
        out = {}
        for lane, start in zip(lanes, starts, strict=True):
            files = LaneFiles.of(wd.root, lane[0])
            if start.proc is None:  # another process's runner owns it (the run lock makes this rare)
                out[start.lane] = LaneStarted(
                    start.lane, "running", start.pid,
                    f"lane {start.lane} is trained by pid {start.pid} (another armlab process); not waited for",
                )  # fmt: skip
                continue
            out[start.lane] = _ended(files, read_lane_state(files), start.proc, shown.get(start.lane))
        return out


def _ended(
    files: LaneFiles,
    st: LaneStatus,
    proc: subprocess.Popen | None = None,
    last: tuple[str, str] | None = None,
) -> LaneStarted:
    """How a lane this command ran ended: its final state, failures and error. A runner killed
    by a signal (kill -9) left its state at running: that is said, naming the run it trained."""
    if proc is not None and proc.returncode is not None and proc.returncode < 0 and st.state == LaneState.RUNNING:
        how = signal.Signals(-proc.returncode).name
        run = st.current.run if st.current else (last[1] if last else None)
        what = f" while training {run}; rerun `armlab run` to resume it from its last checkpoint" if run else ""
        error = f"lane {files.id} died: its runner (pid {proc.pid}) was killed by {how}{what}"
        return LaneStarted(files.id, "died", proc.pid, error, dict(st.failures))
    return LaneStarted(files.id, str(st.state), st.pid, st.error, dict(st.failures))
