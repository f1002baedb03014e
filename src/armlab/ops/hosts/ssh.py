"""The SSH backend: a `[[hosts]]` entry with `scheduler = "ssh"` (the default) is a machine armlab
reaches with the system's OpenSSH client (armlab.ops.ssh.Remote) and trains on lanes there.

The experiment file is copied to the host with its workdir rewritten to the host's and its
[[hosts]] removed, so on the host it is a plain local experiment that the host's own armlab
(installed by `armlab setup`) prepares, trains and stops; everything that reads the host's files
runs there as the agent (armlab.ops.hosts.agent: one SSH round trip, typed JSON out), so paths
are expanded by the host, not guessed here.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from typing import Any

from armlab.errors import ArmlabError
from armlab.ops.doctor import DoctorReport
from armlab.ops.hosts import host_experiment_path, host_experiment_toml, host_python, host_workdir
from armlab.ops.hosts.base import START_TIMEOUT_S, AgentHost
from armlab.ops.hosts.messages import FollowRequest, StartResult, StopRequest
from armlab.ops.hosts.shell import Shell, ShellAgent, armlab_cmd
from armlab.ops.lanes import StopRow
from armlab.ops.ssh import Remote, rpath
from armlab.progress import console
from armlab.spec import Experiment, HostSpec

DOCTOR_TIMEOUT_S = 600


class ShellHost(AgentHost):
    """A host whose side is reached through a shell (SSH, or this machine's for a Slurm login
    node): the experiment file is written there, the agent and the CLI run there."""

    def __init__(self, exp: Experiment, spec: HostSpec, shell: Shell) -> None:
        super().__init__(exp, spec)
        self.shell = shell
        self.python = host_python(spec)
        self.exp_path = host_experiment_path(exp, spec)
        self._pushed = False

    @property
    def agent(self) -> ShellAgent:
        return ShellAgent(self.shell, self.python, self.exp_path)

    def push(self) -> str:
        """Write the host's experiment file there (once per command)."""
        if not self._pushed:
            self.shell.put_text(host_experiment_toml(self.exp, self.spec), self.exp_path)
            self._pushed = True
        return self.exp_path

    def armlab(self, *args: str, timeout: float | None = None, check: bool = True) -> Any:
        """Run the host's armlab CLI there (`armlab prepare EXP ...`)."""
        return self.shell.run(
            armlab_cmd(self.python, *args), timeout=timeout, check=check, what=f"armlab {args[0]}"
        )

    def probe(self, slots: list) -> Any:
        self.push()
        return super().probe(slots)

    def doctor(self, *, device: str | None, expect_data: bool, extra: tuple[str, ...] = ()) -> DoctorReport:
        """`armlab doctor --json` on the host for its arm(s), plus: is its armlab this armlab?"""
        from armlab import __version__
        from armlab.ops.setup import source_fingerprint

        args = [
            "doctor", self.push(), "--local", "--json", "--no-core-bundle",  # launch trains; evaluate checks it
            *(["--master-port", str(self.spec.master_port)] if self.spec.master_port is not None else []),
            *self.world_args(device), *(f"--arm={a}" for a in self.spec.arms),
            *([] if expect_data else ["--no-expect-data"]), *extra,
        ]  # fmt: skip
        p = self.armlab(*args, timeout=DOCTOR_TIMEOUT_S, check=False)
        lines = [ln for ln in p.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
        if not lines:
            err = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln.strip()]
            tail = err[-1].strip() if err else f"exit status {p.returncode}"
            raise ArmlabError(
                f"host {self.name!r}: cannot run armlab there ({tail}); run `armlab setup EXP --host {self.name}`"
            )
        rep = DoctorReport.from_json(lines[-1])
        rep.host = self.name
        info = rep.info
        if info.get("armlab") != __version__ or info.get("armlab_source") != source_fingerprint():
            rep.add(
                "armlab", "fail", f"host runs armlab {info.get('armlab')} (source {info.get('armlab_source')}), "
                f"this machine {__version__} (source {source_fingerprint()})", f"armlab setup EXP --host {self.name}",
            )  # fmt: skip
        else:
            rep.add("armlab", "ok", f"same armlab as this machine ({__version__}, source {source_fingerprint()})")
        return rep

    def world_args(self, device: str | None) -> list[str]:
        """`armlab doctor`'s flags: the entry's device and all its GPUs (or one run's CPU ranks)."""
        if (device or self.spec.device) == "cpu":
            return ["--device", "cpu", "--nproc", str(self.spec.nproc)]
        return ["--device", "cuda", "--num-gpus", str(self.spec.num_gpus)]

    def prepare(self, arms: list[str], mode: str) -> None:
        """prepare: the arms and the tokenizer there; skip: pull the prebuilt ones of `arms`
        (the orchestrator passes those whose data is missing)."""
        exp_path = self.push()
        if mode == "prepare":
            console.print(f"{self.name}: preparing arm(s) {', '.join(arms)} and the tokenizer")
            self.armlab("prepare", exp_path, *(f"--arm={a}" for a in arms))
            self.armlab("tokenizer", exp_path)
            return
        for a in arms:
            if self.exp.arm(a).kind == "prebuilt":
                console.print(f"{self.name}: pulling prebuilt arm {a}")
                self.armlab("pull", exp_path, "--arm", a)


class SshHost(ShellHost):
    """One machine (`ssh`), or several (`nodes`, node 0 first) that every run spans: node 0's lane
    runners lead (they own the runs), a follower runner on each other node joins each run
    (armlab.ops.lane_runner.follow_lane). The workdir is on a filesystem every node mounts: the
    data is prepared once, on node 0."""

    def __init__(self, exp: Experiment, spec: HostSpec) -> None:
        super().__init__(exp, spec, Remote.from_spec(spec))
        self.nodes = [Remote(name=spec.name, target=t, port=spec.port) for t in spec.nodes or []]

    def machine(self) -> str:
        """`address:ssh-port` of (node 0 of) the entry: aliases and IPs of one machine compare equal."""
        name, port = Remote.from_spec(self.spec).resolve()
        with contextlib.suppress(OSError):
            name = socket.getaddrinfo(name, port, proto=socket.IPPROTO_TCP)[0][4][0]
        return f"{name}:{port}"

    def node_agent(self, k: int) -> ShellAgent:
        return ShellAgent(self.nodes[k], self.python, self.exp_path)

    def check(self, slots: list) -> None:
        """A run across nodes needs one workdir they all see: node 0 writes a file there, every
        other node must read it back."""
        if not self.nodes:
            return
        probe = f"{host_workdir(self.exp, self.spec)}/.armlab-nodes-{uuid.uuid4().hex[:12]}"
        self.shell.put_text(probe, probe)
        try:
            for k, node in enumerate(self.nodes[1:], 1):
                seen = node.run(f"cat {rpath(probe)}", check=False, what="reading the workdir").stdout.decode()
                if seen.strip() != probe:
                    raise ArmlabError(
                        f"host {self.name!r}: node {k} ({node.target}) does not see the workdir node 0 "
                        f"({self.nodes[0].target}) wrote ({host_workdir(self.exp, self.spec)}); a run's nodes "
                        "share it: set workdir to a filesystem every node mounts (NFS, Lustre, ...)"
                    )
        finally:
            self.shell.run(f"rm -f {rpath(probe)}", check=False)

    def doctor(self, *, device: str | None, expect_data: bool, extra: tuple[str, ...] = ()) -> DoctorReport:
        """Node 0's report, with every other node's checks (its armlab, packages, GPUs) as `node K ...`."""
        rep = super().doctor(device=device, expect_data=expect_data, extra=extra)
        for k in range(1, len(self.nodes)):
            other = ShellHost(self.exp, self.spec, self.nodes[k])
            for c in other.doctor(device=device, expect_data=expect_data, extra=extra).checks:
                rep.add(f"node {k} {c.name}", c.status, f"{self.nodes[k].target}: {c.detail}", c.fix)
        return rep

    def start(self, slots: list) -> StartResult:
        """Node 0's lanes first (their runners lead), then a follower runner on every other node."""
        result = super().start(slots)
        for k in range(1, len(self.nodes)):
            self.node_agent(k).call("follow", FollowRequest(slots, k), timeout=START_TIMEOUT_S)
        return result

    def stop(self, arms: list[str], timeout: float) -> list[StopRow]:
        """Node 0's runs (they checkpoint), then what still follows them on the other nodes."""
        rows = super().stop(arms, timeout)
        for k in range(1, len(self.nodes)):
            self.node_agent(k).call("stop", StopRequest(arms, timeout), timeout=timeout + 120)
        return rows
