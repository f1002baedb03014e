"""Slurm on the cluster's side: what runs on the login node (behind the agent, armlab.ops.hosts.agent)
and in each job (its batch step). The client half is armlab.ops.hosts.slurm.

Every run (arm x seed) is one job, and a run longer than the walltime a chain of jobs. Beside the
run dir, `arms/<arm>/runs/<run>.jobs/` holds its Slurm side:

    chain.json   the run's chain (JobChain: the settings of its job, the job ids in order)
    job.sh       the batch script: the entry's `extra_sbatch` lines, then this module as the driver
    <jobid>.out  each job's output (the ranks' output included: what `armlab logs` shows)
    stop         present once `armlab stop` asked the run to stop: the chain ends there

The driver (`python -m armlab.ops.hosts.slurm_jobs CHAIN`, the batch step) runs `armlab train
--resume` under `srun`, one task per node (a multi-node run meets at node 0's address, its
NodeAddr, and a port free there: torchrun's static rendezvous, node rank = $SLURM_NODEID), and
forwards to it what Slurm signals the batch step with (`--signal=B:USR1@<warning>` before the
time limit, SIGTERM on preemption or `scancel --full`); srun passes them to the trainers, which
finish the step, checkpoint and exit 130 (resumable). `scancel --signal=USR1 <job>` reaches the
trainers directly (the steps, not the batch step): the same stop.
On a resumable exit, unless `armlab stop` asked for it, the driver submits the chain's next job
with `--dependency=afterany:<this job>` and records it before its own job ends, so at every
moment the chain's last job is the live one, and a rerun of `launch` (which submits only for a
run whose last job has ended) never submits a second. Jobs are `--no-requeue`: Slurm never
restarts one behind the chain's back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from armlab.errors import ArmlabError
from armlab.ops.hosts import agent
from armlab.ops.hosts.messages import (
    HostProbe,
    JobView,
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
from armlab.records import Record
from armlab.runs import RunState, read_state, request_stop
from armlab.spec import Experiment, HostSpec
from armlab.workdir import Workdir, atomic_write_json, atomic_write_text, freeze_spec, open_workdir, read_json

JOBS_SUFFIX = ".jobs"  # arms/<arm>/runs/<run>.jobs/, beside the run dir
CHAIN, SCRIPT, STOP = "chain.json", "job.sh", "stop"
RESUMABLE = 130  # `armlab train`'s exit after a stop: checkpointed, resumes with --resume
# squeue's states of a job that is not over (squeue(1), JOB STATE CODES)
ACTIVE = frozenset({
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_FED",
    "REQUEUE_HOLD", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED",
})  # fmt: skip
STOP_POLL_S = 0.5


@dataclass(frozen=True)
class JobSettings(Record):
    """What a run's jobs need, from its `[[hosts]]` entry and its slot."""

    host: HostSpec
    exp_path: str  # the experiment file on the cluster
    python: str  # the interpreter with armlab on the nodes
    arm: str
    seed: int
    run: str
    device: str
    ranks_per_node: int
    nnodes: int
    warning_s: int | None  # Slurm signals the batch step this long before the time limit

    def sbatch_options(self, jobs_dir: Path) -> list[str]:
        h = self.host
        opts = [
            f"--job-name=armlab-{self.run}", f"--partition={h.partition}", f"--nodes={self.nnodes}",
            "--ntasks-per-node=1", "--no-requeue", "--open-mode=append", f"--output={jobs_dir}/%j.out",
            "--parsable",
        ]  # fmt: skip
        opts += [f"--account={h.account}"] if h.account else []
        opts += [f"--qos={h.qos}"] if h.qos else []
        opts += [f"--time={h.time}", f"--signal=B:USR1@{self.warning_s}"] if h.time else []
        opts += [f"--cpus-per-task={self.cpus_per_task}"] if self.cpus_per_task else []
        opts += [f"--gpus-per-node={self.ranks_per_node}"] if self.device == "cuda" else []
        return opts

    @property
    def cpus_per_task(self) -> int | None:
        """The entry's, else on CPU one core per rank (a node's task holds all its ranks)."""
        return self.host.cpus_per_task or (self.ranks_per_node if self.device == "cpu" else None)

    def script(self, chain: Path) -> str:
        lines = ["#!/bin/bash", *self.host.extra_sbatch]
        lines.append(f"exec {shlex.quote(self.python)} -m armlab.ops.hosts.slurm_jobs {shlex.quote(str(chain))}")
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class JobLink(Record):
    job_id: str
    submitted: float
    after: str | None = None  # the job it continues (None: the chain's first)


@dataclass(frozen=True)
class JobChain(Record):
    settings: JobSettings
    links: list[JobLink] = field(default_factory=list)


# -- files and the scheduler ----------------------------------------------------------------------------
def jobs_dir(wd: Workdir, arm: str, run: str) -> Path:
    return wd.runs_dir(arm) / f"{run}{JOBS_SUFFIX}"


def read_chain(d: Path) -> JobChain | None:
    try:
        return JobChain.from_json(read_json(d / CHAIN), str(d / CHAIN))
    except (FileNotFoundError, ArmlabError):
        return None


def slurm(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """A Slurm client command; not installed or failing is one ArmlabError line."""
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ArmlabError(f"`{argv[0]}` not found: this is not a Slurm login node (install slurm-client?)") from None
    except subprocess.TimeoutExpired:
        raise ArmlabError(f"`{' '.join(argv)}` did not answer within {timeout:.0f}s: is slurmctld up?") from None
    return p


def sbatch(script: Path, options: list[str]) -> str:
    p = slurm("sbatch", *options, str(script))
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
        raise ArmlabError(f"sbatch refused the job: {err.removeprefix('sbatch: error: ')}")
    return p.stdout.strip().split(";")[0]


def squeue(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """job id -> (state, reason, node list) for the jobs Slurm still knows (ended ones for MinJobAge)."""
    if not job_ids:
        return {}
    p = slurm("squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", "%i|%T|%r|%N")
    if p.returncode != 0 and "Invalid job id" not in p.stderr:
        raise ArmlabError(f"squeue failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    out = {}
    for line in p.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            out[parts[0]] = (parts[1], parts[2], parts[3])
    return out


def views(chains: dict[str, JobChain]) -> dict[str, JobView]:
    """run -> its chain's last job as Slurm sees it (ENDED once Slurm forgot it)."""
    last = {run: c.links[-1] for run, c in chains.items() if c.links}
    seen = squeue([link.job_id for link in last.values()])
    out = {}
    for run, link in last.items():
        state, reason, nodes = seen.get(link.job_id, ("ENDED", None, None))
        c = chains[run]
        out[run] = JobView(run, c.settings.arm, link.job_id, state, reason, nodes or None, len(c.links))
    return out


def _chains(wd: Workdir, runs: list[tuple[str, str]]) -> dict[str, JobChain]:
    out = {}
    for arm, run in runs:
        c = read_chain(jobs_dir(wd, arm, run))
        if c is not None:
            out[run] = c
    return out


# -- the agent's Slurm ops (on the login node) -------------------------------------------------------------
@dataclass(frozen=True)
class SubmitRequest(Record):
    slots: list[Slot]
    host: HostSpec
    python: str
    exp_path: str


def probe(exp: Experiment, req: SlotsRequest) -> HostProbe:
    """The generic probe, with each run's live job: a run is alive while its job runs (its pid is
    a compute node's, which the login node cannot see)."""
    base = agent.probe(exp, req)
    wd = open_workdir(exp, create=False)
    jobs = {r: v for r, v in views(_chains(wd, [(s.arm, s.run) for s in req.slots])).items() if v.state in ACTIVE}
    runs = {
        r: dataclasses.replace(p, alive=jobs.get(r) is not None and jobs[r].state == "RUNNING")
        for r, p in base.runs.items()
    }
    return dataclasses.replace(base, runs=runs, jobs=jobs, lanes={})  # no lanes: Slurm queues the jobs


def start(exp: Experiment, req: SubmitRequest) -> StartResult:
    """A job for every slot whose run is not done and has no pending or running job; refused
    before any submission when a run's ranks cannot be fed by its arm's shards."""
    from armlab.train.units import check_feeds

    wd = open_workdir(exp, create=False)
    h = req.host
    for arm in sorted({s.arm for s in req.slots}):
        world = req.slots[0].world_size
        try:
            check_feeds(wd.data_dir(arm), world)
        except ArmlabError as e:
            raise ArmlabError(
                f"host {h.name!r}: nodes_per_run ({h.nodes_of_run}) x {'gpus_per_node' if req.slots[0].device == 'cuda' else 'nproc'} "
                f"({world // h.nodes_of_run}) = {world} ranks per run: {e}"
            ) from None
    chains = _chains(wd, [(s.arm, s.run) for s in req.slots])
    live = {r: v for r, v in views(chains).items() if v.state in ACTIVE}
    jobs = dict(live)
    for s in req.slots:
        if s.run in live or read_state(wd.run_dir(s.arm, s.run)).get("state") == RunState.DONE:
            continue
        d = jobs_dir(wd, s.arm, s.run)
        settings = JobSettings(
            host=h, exp_path=req.exp_path, python=req.python, arm=s.arm, seed=s.seed, run=s.run, device=s.device,
            ranks_per_node=s.world_size // s.nnodes, nnodes=s.nnodes, warning_s=warning_s(h.walltime_s),
        )  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            (d / STOP).unlink()  # a new chain: an old stop no longer holds
        job = submit(d, settings, after=None)
        jobs[s.run] = JobView(s.run, s.arm, job.job_id, "PENDING", None, None, 1)
    freeze_spec(wd, exp)
    return StartResult({}, agent.probe(exp, SlotsRequest(req.slots)).tokenizer, jobs)


SLURM_EARLY_S = 60  # sbatch(1) --signal: "the signal may be sent up to 60 seconds earlier than specified"
MIN_WALLTIME_S = 120  # below it a job could be warned at its start (armlab.ops.hosts.slurm refuses it)


def warning_s(walltime: int | None) -> int | None:
    """How long before the time limit Slurm warns a job: 2 min, at most a quarter of the walltime,
    so a job trains at least walltime - warning - SLURM_EARLY_S before it is asked to stop."""
    return None if walltime is None else max(1, min(120, walltime // 4))


def submit(d: Path, settings: JobSettings, after: str | None) -> JobLink:
    """Write the chain's script and submit one job of it; the chain records it (a new chain when
    `after` is None)."""
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / SCRIPT, settings.script(d / CHAIN))
    old = read_chain(d)
    options = settings.sbatch_options(d) + ([f"--dependency=afterany:{after}"] if after else [])
    job_id = sbatch(d / SCRIPT, options)
    link = JobLink(job_id, time.time(), after)
    links = [*(old.links if old and after else []), link]
    atomic_write_json(d / CHAIN, JobChain(settings, links).to_json())
    return link


def mirror(exp: Experiment, req: MirrorRequest) -> MirrorPayload:
    base = agent.mirror(exp, req)
    wd = open_workdir(exp, create=False)
    found = [
        (arm, p.name.removesuffix(JOBS_SUFFIX))
        for arm in req.arms
        for p in sorted(wd.runs_dir(arm).glob(f"*{JOBS_SUFFIX}"))
    ]
    return dataclasses.replace(base, jobs=list(views(_chains(wd, found)).values()))


def stop(exp: Experiment, req: StopRequest) -> StopResult:
    """Stop every run of these arms whose job is pending or running: mark the chain stopped (no next
    job), then a pending job is cancelled, a running one gets SIGTERM in its steps (the trainer
    checkpoints and exits) and is cancelled if it has not ended after the timeout."""
    wd = open_workdir(exp, create=False)
    found = [
        (arm, p.name.removesuffix(JOBS_SUFFIX))
        for arm in req.arms
        for p in sorted(wd.runs_dir(arm).glob(f"*{JOBS_SUFFIX}"))
    ]
    chains = _chains(wd, found)
    live = {r: v for r, v in views(chains).items() if v.state in ACTIVE}
    for v in live.values():
        (jobs_dir(wd, v.arm, v.run) / STOP).touch()  # no next job
        if v.state != "PENDING":  # read by every node's ranks at their step's end, as the signal is
            request_stop(wd.run_dir(v.arm, v.run), "armlab stop")
    for v in live.values():
        slurm("scancel", v.job_id) if v.state == "PENDING" else slurm("scancel", "--signal=TERM", v.job_id)
    deadline = time.time() + req.timeout
    rows = []
    for run, v in live.items():
        result = "cancelled (pending)" if v.state == "PENDING" else "stopped (SIGTERM)"
        while v.state != "PENDING" and views({run: chains[run]})[run].state in ACTIVE:
            if time.time() > deadline:
                slurm("scancel", v.job_id)
                result = f"cancelled after {req.timeout:.0f}s (did not stop)"
                break
            time.sleep(STOP_POLL_S)
        row = StopRow(v.arm, run, read_state(wd.run_dir(v.arm, run)).get("pid"), f"{result}, job {v.job_id}")
        rows.append(agent.with_restart(wd.run_dir(v.arm, run), row))
    return StopResult(rows)


def logs(exp: Experiment, req: LogsRequest) -> None:
    """The output of the run's last job (the ranks' output included), else its train.log."""
    wd = open_workdir(exp, create=False)
    run = req.run or agent.log_path(exp, req.arm, None).parent.name
    chain = read_chain(jobs_dir(wd, req.arm, run))
    if chain is None or not chain.links:
        return agent.logs(exp, req)
    out = jobs_dir(wd, req.arm, run) / f"{chain.links[-1].job_id}.out"
    if not out.exists():
        raise ArmlabError(f"{out}: job {chain.links[-1].job_id} has written no output yet (pending?)")
    sys.stdout.flush()
    os.execvp("tail", agent.tail_argv(out, req.lines, req.follow))


OPS = {
    "probe": (SlotsRequest, probe, HostProbe),
    "start": (SubmitRequest, start, StartResult),
    "mirror": (MirrorRequest, mirror, MirrorPayload),
    "stop": (StopRequest, stop, StopResult),
    "logs": (LogsRequest, logs, None),
}


def _run_dir(jobs: Path) -> Path:
    return jobs.with_name(jobs.name.removesuffix(JOBS_SUFFIX))


# -- the job's batch step ---------------------------------------------------------------------------------
def _head_address() -> str:
    """Node 0's address: the first node of the job, as Slurm reaches it (its NodeAddr)."""
    nodes = slurm("scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]).stdout.split()
    info = slurm("scontrol", "show", "node", "-o", nodes[0]).stdout
    fields = dict(f.split("=", 1) for f in info.split() if "=" in f)
    return fields.get("NodeAddr") or nodes[0]


def _free_port() -> int:
    """A port free on this node (the batch step runs on node 0, where the rendezvous is served);
    node 0's torchrun binds it a moment later."""
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def train_argv(s: JobSettings) -> list[str]:
    """`srun ... armlab train --resume` on every node of the job."""
    code = "import sys; sys.argv[0] = 'armlab'; from armlab.cli import main; main()"
    ranks = ["--num-gpus", str(s.ranks_per_node)] if s.device == "cuda" else ["--nproc", str(s.ranks_per_node)]
    nodes = []
    if s.nnodes > 1:  # node rank: $SLURM_NODEID, read by `armlab train`; a static rendezvous at node 0
        nodes = ["--nnodes", str(s.nnodes), "--rdzv-endpoint", f"{_head_address()}:{_free_port()}"]
    srun = ["srun", f"--nodes={s.nnodes}", "--ntasks-per-node=1"]
    srun += [f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []  # srun does not inherit it (22.05)
    srun += [f"--gpus-per-node={s.ranks_per_node}"] if s.device == "cuda" else []  # the step's own GPUs
    return [
        *srun, s.python, "-c", code, "train", s.exp_path, "--arm", s.arm, "--seed", str(s.seed),
        "--run-name", s.run, "--resume", "--device", s.device, *ranks, *nodes,
    ]  # fmt: skip


def job_main(chain_path: str) -> int:
    """The batch step of a run's job (see the module docstring); its exit code is the trainer's."""
    d = Path(chain_path).parent
    chain = read_chain(d)
    if chain is None:
        print(f"armlab: error: {chain_path}: no chain record", file=sys.stderr, flush=True)
        return 2
    job_id = os.environ["SLURM_JOB_ID"]
    s = chain.settings
    link = next((i for i, x in enumerate(chain.links, 1) if x.job_id == job_id), len(chain.links))
    print(f"armlab: {s.run}: job {job_id}, link {link} of its chain, on {os.environ.get('SLURM_JOB_NODELIST')}",
          flush=True)  # fmt: skip
    before = read_state(_run_dir(d)).get("resume_step")  # where the last job stopped
    proc = subprocess.Popen(train_argv(s))
    warned = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal warned
        if signum == signal.SIGUSR1 and not warned:
            warned = True
            print(f"armlab: {s.run}: the time limit is near (SIGUSR1): the trainers checkpoint and stop; the "
                  "next job continues", flush=True)  # fmt: skip
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)  # srun passes it to the trainers on every node

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    rc = proc.wait()
    resumable = rc == RESUMABLE or (warned and rc > 128)  # killed before its handlers were up
    if not resumable or (d / STOP).exists():
        print(f"armlab: {s.run}: job {job_id} ends (exit {rc}){'; stopped by armlab stop' if resumable else ''}",
              flush=True)  # fmt: skip
        return rc
    after = read_state(_run_dir(d)).get("resume_step")
    if link > 1 and after is not None and after == before:  # a job too short to train a step: no endless chain
        print(f"armlab: {s.run}: job {job_id} made no progress (still at step {after}); no next job: raise the "
              "entry's time, then `armlab launch` again", flush=True)  # fmt: skip
        return rc
    nxt = submit(d, s, after=job_id)
    print(f"armlab: {s.run}: stopped resumably; link {link + 1} is job {nxt.job_id} (after {job_id})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1]))
