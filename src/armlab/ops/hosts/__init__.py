"""Hosts: the one seam between the orchestrator and the places where runs execute.

A *host* is one `[[hosts]]` entry (or this machine, for `armlab run`) and the way to reach it.
The orchestrator (armlab.ops.launch) is written once against the `Host` protocol below; each
backend is one module:

    this machine   armlab.ops.hosts.local:LocalHost   `armlab run`: lanes here, in this process
    ssh            armlab.ops.hosts.ssh:SshHost       lanes on a machine over SSH (one node, or
                                                      several: one torchrun per node)
    slurm          armlab.ops.hosts.slurm:SlurmHost   one batch job per run, torchrun under srun,
                                                      reached here (a login node) or over SSH

Who calls what (the answers are typed records, armlab.ops.hosts.messages):

    launch / run    host.check(slots)             refusals before anything starts (Slurm: partition,
                                                  walltime vs checkpoint interval)
                    host.probe(slots)             -> HostProbe: runs, lanes, data, jobs
                    host.doctor(...)              -> DoctorReport (preflight on the host)
                    host.prepare(arms, mode)      the data steps, on the host (Slurm: a CPU job)
                    host.start(slots)             -> StartResult: lanes started / jobs submitted,
                                                  detached (LocalHost: attached, `armlab run`)
    status          host.mirror()                 -> MirrorPayload: small run files, lanes, jobs
    stop            host.stop(arms, timeout)      -> list[StopRow] (the run checkpoints first)
    logs            host.logs(arm, run, ...)      a run's log streamed to this terminal

Most of that is the same host-side code (armlab.ops.hosts.agent) reached in process or through a
shell; `armlab.ops.hosts.base.AgentHost` is that default. A new backend (SkyPilot, Kubernetes) is
one module implementing the protocol plus one line in `BACKENDS` and a `scheduler` value in the
spec.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

from armlab.errors import ArmlabError
from armlab.ops.ssh import DEFAULT_REMOTE_PYTHON  # a host set up by `armlab setup`

if TYPE_CHECKING:
    from armlab.ops.doctor import DoctorReport
    from armlab.ops.hosts.messages import HostProbe, MirrorPayload, StartResult
    from armlab.ops.lanes import StopRow
    from armlab.ops.schedule import Slot
    from armlab.spec import Experiment, HostSpec

# `[[hosts]] scheduler` -> "module:class". Adding a backend is one line here plus its module.
BACKENDS = {
    "ssh": "armlab.ops.hosts.ssh:SshHost",
    "slurm": "armlab.ops.hosts.slurm:SlurmHost",
}


class Host(Protocol):
    """Where runs execute. Every method may raise ArmlabError (one line naming the host)."""

    exp: Experiment  # the experiment as this machine has it (its [[hosts]] included)
    spec: HostSpec  # the entry (for `armlab run`: this machine as one entry, "local")

    @property
    def name(self) -> str: ...

    def machine(self) -> str:
        """A label of the machine the entry reaches: entries with the same label share its GPUs
        and ports (the schedule gives them disjoint GPU blocks and refuses a port twice)."""
        ...

    def check(self, slots: list[Slot]) -> None:
        """Refusals of the entry's own settings, before anything is touched on the host."""
        ...

    def probe(self, slots: list[Slot]) -> HostProbe: ...

    def doctor(self, *, device: str | None, expect_data: bool, extra: tuple[str, ...] = ()) -> DoctorReport: ...

    def prepare(self, arms: list[str], mode: str) -> None:
        """`mode` "prepare": prepare the arms and train the tokenizer there; "skip": the data must
        be there already (prebuilt arms are pulled)."""
        ...

    def start(self, slots: list[Slot]) -> StartResult: ...

    def mirror(self) -> MirrorPayload: ...

    def stop(self, arms: list[str], timeout: float) -> list[StopRow]: ...

    def logs(self, arm: str, run: str | None, lines: int, follow: bool) -> int: ...


def get_host(exp: Experiment, spec: HostSpec) -> Host:
    """The backend of a `[[hosts]]` entry, by its `scheduler`."""
    try:
        target = BACKENDS[spec.scheduler]
    except KeyError:
        raise ArmlabError(
            f"host {spec.name!r}: scheduler {spec.scheduler!r}: use one of {', '.join(BACKENDS)}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(exp, spec)


# -- where things live on a host ----------------------------------------------------------------------
def host_python(spec: HostSpec) -> str:
    return spec.python or DEFAULT_REMOTE_PYTHON


def host_workdir(exp: Experiment, spec: HostSpec) -> str:
    """The workdir on the host, unexpanded (`~` is the host's home)."""
    return (spec.workdir or exp.workdir or f"~/.cache/armlab/{exp.name}").rstrip("/")


def host_experiment_path(exp: Experiment, spec: HostSpec) -> str:
    return host_workdir(exp, spec) + "/experiment.toml"


def host_experiment(exp: Experiment, spec: HostSpec) -> Experiment:
    """The experiment as the host sees it: its own workdir and nanochat checkout ([[hosts]]
    nanochat, `~` expanded there), no [[hosts]]: a plain local experiment."""
    nanochat = exp.nanochat.model_copy(update={"path": spec.nanochat or exp.nanochat.path})
    return exp.model_copy(update={"workdir": host_workdir(exp, spec), "hosts": [], "nanochat": nanochat})


def host_experiment_toml(exp: Experiment, spec: HostSpec) -> str:
    from armlab.workdir import to_toml

    return to_toml(host_experiment(exp, spec).model_dump(mode="json", exclude_none=True))
