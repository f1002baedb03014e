"""The Slurm backend: a `[[hosts]]` entry with `scheduler = "slurm"` hands each run (arm x seed) to
the cluster's scheduler as a batch job running `armlab train` under `srun`, one task per node
(`nodes_per_run` nodes, `gpus_per_node` GPUs or `nproc` CPU ranks each, a c10d/static rendezvous at
node 0). The workdir lives on the cluster's shared filesystem.

The cluster is reached on this machine (a login node: no `ssh` in the entry) or over SSH to a login
node. Its side (armlab.ops.hosts.slurm_jobs) runs there behind the agent: submit, the jobs as squeue
sees them joined with the run dirs, stop, logs; and in each job as its batch step, which turns a
stop before the time limit (or a preemption) into the next job of the run's chain.

Refused before anything is submitted, one line naming the key: a partition the cluster does not
have (`sinfo`), `nodes_per_run` x `gpus_per_node` ranks that the arm's shards cannot feed
(`check_feeds`, once the data is there), and a `time` shorter than one checkpoint interval
(`save_every` steps at a measured step time, or on CUDA one estimated from the budget).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import cast

from armlab.errors import ArmlabError
from armlab.ops.hosts import host_workdir
from armlab.ops.hosts.messages import StartResult
from armlab.ops.hosts.shell import LocalShell, armlab_cmd
from armlab.ops.hosts.slurm_jobs import SubmitRequest
from armlab.ops.hosts.ssh import ShellHost
from armlab.ops.schedule import Slot
from armlab.ops.ssh import Remote
from armlab.progress import console
from armlab.spec import Experiment, HostSpec

ESTIMATE_GPU = "H100"  # the walltime check's step time without a measurement: this GPU's peak x MFU


class SlurmHost(ShellHost):
    OPS_PREFIX = "slurm."  # armlab.ops.hosts.slurm_jobs.OPS

    def __init__(self, exp: Experiment, spec: HostSpec) -> None:
        shell = Remote.from_spec(spec) if spec.ssh else LocalShell(spec.name)
        super().__init__(exp, spec, shell)
        if spec.python is None and spec.ssh is None:
            self.python = sys.executable  # the login node's armlab is this one
        self.exp_path = f"{host_workdir(exp, spec)}/hosts/{spec.name}.toml"

    @property
    def local_workdir(self) -> Path | None:
        """The workdir, when the login node is this machine."""
        return None if self.spec.ssh else Path(os.path.expanduser(host_workdir(self.exp, self.spec)))

    def machine(self) -> str:
        return f"slurm:{self.spec.ssh or 'localhost'}"

    # -- refusals before anything is submitted ----------------------------------------------------------
    def check(self, slots: list[Slot]) -> None:
        p = self.shell.run("sinfo -h -o %R", check=False, timeout=60, what="sinfo")
        if p.returncode != 0:
            raise ArmlabError(
                f"host {self.name!r}: `sinfo` failed there ({p.stderr.decode(errors='replace').strip()}); "
                "is it a Slurm login node?"
            )
        known = sorted(set(p.stdout.decode().split()))
        for key in ("partition", "prepare_partition"):
            value = getattr(self.spec, key)
            if value is not None and value not in known:
                raise ArmlabError(
                    f"host {self.name!r}: {key} = {value!r} is not a partition of this cluster "
                    f"(sinfo lists: {', '.join(known)}); fix {key} in [[hosts]]"
                )
        self._check_walltime(slots)

    def _check_walltime(self, slots: list[Slot]) -> None:
        from armlab.ops.hosts.slurm_jobs import MIN_WALLTIME_S, SLURM_EARLY_S

        wall = self.spec.walltime_s
        if wall is None or not slots:
            return
        if wall < MIN_WALLTIME_S:
            raise ArmlabError(
                f"host {self.name!r}: time = {self.spec.time!r} ({wall} s) is too short: Slurm warns a job of its "
                f"time limit up to {SLURM_EARLY_S} s early, so it could be stopped as it starts; use at least "
                f"{MIN_WALLTIME_S // 60} minutes"
            )
        step_s, how = self._step_time(slots[0])
        if step_s is None:
            return
        every = self.exp.train.save_every
        interval = every * step_s
        if wall < interval:
            raise ArmlabError(
                f"host {self.name!r}: time = {self.spec.time!r} ({wall} s) is shorter than one checkpoint interval "
                f"(train.save_every = {every} steps x {step_s:.3g} s a step, {how} = {interval:,.0f} s): a job "
                "stopped by its time limit would lose its work; raise time, or lower train.save_every"
            )

    def _step_time(self, slot: Slot) -> tuple[float | None, str]:
        """Seconds a step: measured by a run of this entry (its metrics' tok/s), else on CUDA the
        budget's FLOPs at ESTIMATE_GPU peak x MFU (CPU: no estimate)."""
        from armlab.cost import DEFAULT_MFU, PEAK_FLOPS
        from armlab.train.engines import get_engine

        budget = get_engine(self.exp.train.engine).budget(self.exp, self.exp.tokenizer.vocab_size)
        measured = self._measured_tok_per_s(slot.world_size)
        if measured:
            return budget.total_batch_size / measured, f"measured: {measured:,.0f} tok/s by an earlier run here"
        if slot.device != "cuda":
            return None, ""
        flops = budget.flops_per_token * budget.total_batch_size
        return (
            flops / (slot.world_size * PEAK_FLOPS[ESTIMATE_GPU] * DEFAULT_MFU),
            f"estimated from the budget at {ESTIMATE_GPU} peak x MFU {DEFAULT_MFU:.0%}",
        )

    def _measured_tok_per_s(self, world: int) -> float | None:
        from armlab.runs import load_run
        from armlab.workdir import open_workdir

        wd = open_workdir(self.exp, create=False)
        base = self.local_workdir or wd.root / "remote" / self.name
        speeds = []
        for arm in self.spec.arms:
            for d in sorted(base.glob(f"arms/{arm}/runs/*/run.json")):
                try:
                    rec = load_run(d.parent)
                except ArmlabError:
                    continue
                if rec.info.get("config", {}).get("world_size") == world:
                    speeds += [m["tok_per_s"] for m in rec.train_lines if m.get("tok_per_s")]
        return sorted(speeds)[len(speeds) // 2] if speeds else None

    # -- the protocol ----------------------------------------------------------------------------------
    def world_args(self, device: str | None) -> list[str]:
        """doctor runs on the login node (no GPUs there): it checks the data feeds a run's ranks."""
        ranks = self.spec.ranks_per_node(device) * self.spec.nodes_of_run
        return ["--device", "cpu", "--nproc", str(ranks)]

    def prepare(self, arms: list[str], mode: str) -> None:
        """On the login node, or with `prepare_partition` as a CPU job there (waited for)."""
        if mode != "prepare" or not self.spec.prepare_partition:
            return super().prepare(arms, mode)
        exp_path = self.push()
        h = self.spec
        steps = [armlab_cmd(self.python, "prepare", exp_path, *(f"--arm={a}" for a in arms)),
                 armlab_cmd(self.python, "tokenizer", exp_path)]  # fmt: skip
        out = f"{host_workdir(self.exp, h)}/hosts/{h.name}.prepare.%j.out"
        opts = [f"--partition={h.prepare_partition}", "--job-name=armlab-prepare", f"--output={out}", "--wait",
                "--parsable", "--no-requeue", *([f"--account={h.account}"] if h.account else []),
                *([f"--qos={h.qos}"] if h.qos else []), *([f"--cpus-per-task={h.cpus_per_task}"] if h.cpus_per_task else [])]  # fmt: skip
        console.print(f"{self.name}: preparing arm(s) {', '.join(arms)} and the tokenizer as a job on partition "
                      f"{h.prepare_partition}")  # fmt: skip
        cmd = "mkdir -p " + shlex.quote(os.path.dirname(out)) + " && sbatch " + " ".join(map(shlex.quote, opts))
        p = self.shell.run(f"{cmd} --wrap {shlex.quote(' && '.join(steps))}", check=False, timeout=None,
                           what="the prepare job")  # fmt: skip
        job = p.stdout.decode(errors="replace").strip().split(";")[0].splitlines()[-1:] or ["?"]
        if p.returncode != 0:
            log = out.replace("%j", job[0])
            tail = self.shell.run(f"tail -n 3 {shlex.quote(log)}", check=False).stdout.decode(errors="replace")
            last = [ln for ln in tail.splitlines() if ln.strip()][-1:] or [p.stderr.decode(errors="replace").strip()]
            raise ArmlabError(f"host {self.name!r}: the prepare job {job[0]} failed: {last[0]} (its output: {log})")

    def start(self, slots: list[Slot]) -> StartResult:
        req = SubmitRequest(slots, self.spec, self.python, self.push())
        return cast(StartResult, self.agent.call(self.OPS_PREFIX + "start", req, timeout=600))


