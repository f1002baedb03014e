"""A real Slurm cluster on loopback for the tests: Debian's slurm-wlm and munge, private to its caller.

    from slurm_util import slurm_cluster      # or the session fixtures `slurm` / `slurm_2nodes` (conftest.py)

    with slurm_cluster(tmp_path / "slurm", nodes=2) as c:
        job = c.sbatch("--nodes=2", "--ntasks-per-node=2", script="#!/bin/bash\\nsrun hostname\\n")
        c.wait_job(job)["JobState"]           # 'COMPLETED'
        subprocess.run(["squeue"], env=c.env)  # any Slurm client, pointed at this cluster by SLURM_CONF

What runs (files under `root`, sockets under a short `run_dir`; every daemon stopped by pid on exit):
- `munged -F` with its own key, socket, pid and seed files; Slurm finds it through
  `AuthInfo=socket=...` (slurm.conf(5): "socket: Path name to a MUNGE daemon socket to use ... Used by
  auth/munge and cred/munge"), so the machine's own munged (if any) is never involved.
- `slurmctld -D` on a free loopback port (`SlurmctldHost=<this host>(127.0.0.1)`: slurmctld only
  runs where the name matches its hostname; the address in brackets is what everyone connects to).
- one `slurmd -D -N nK` per node, each on its own free port (`NodeName=nK NodeAddr=127.0.0.1 Port=`).
  Several slurmd on one host work with Debian's 22.05 build (it even accepts two nodes with the
  same NodeHostname, which only --enable-multiple-slurmd builds allow): the spool and pid paths take
  `%n` (the node name), and a `--nodes=2` job gets tasks on both (tests/test_slurm_cluster.py).

Nodes offer `cpus` CPUs each (default 4, more than this machine's 2 cores: `SlurmdParameters=
config_overrides` makes Slurm believe slurm.conf, "generally only useful for testing purposes"), so two
1-CPU jobs run side by side and a full node leaves a job PENDING (Resources). CPUs are the only
resource (`SelectType=select/cons_tres`, `CR_CPU`); processes are tracked by parentage
(`proctrack/linuxproc`, `task/none`: no cgroups, which a VM or container may not give us). No
accounting database: `squeue`/`scontrol` report every job for `MinJobAge` (a day) after it ends.
Two partitions on every node: `cpu` (the default) and `gpu` (named so; no GPUs), for "prepare on
another partition". `cred_expire` is short because it is also how long a requeued job waits before it
may start again (slurm.conf(5) AuthInfo: default 120 s).

Private per cluster, so pytest-xdist workers and other users of this machine never collide: every
port, socket, spool/state dir, pid and log file, the ClusterName, and the job ids (`FirstJobId` is
random, so job-id-derived names differ between clusters). Clients reach it only through `env`
(`SLURM_CONF=<root>/slurm.conf`; every inherited SLURM_*/SBATCH_*/SRUN_*/SQUEUE_* variable removed).

The daemons run as the current user (`SlurmUser`/`SlurmdUser`): as root (CI) and as an ordinary user
(seen: `nobody` ran a 2-node job with srun steps), since every job is that user's own. Missing
packages FAIL the fixture ("run scripts/test.sh"); a skipped Slurm test must never count as a pass.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sshd_util import free_port

DAEMONS = ("munged", "slurmctld", "slurmd", "slurmstepd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
PARTITIONS = ("cpu", "gpu")  # the first is the default partition
# Job states after which a job runs no more (squeue(1) "JOB STATE CODES"); a requeued job goes back to PENDING.
ENDED = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
START_TIMEOUT_S = 60  # generous: the 2-core machine may be busy with other helpers' tests
# Client environment variables that would change what the commands do (e.g. SQUEUE_FORMAT, SBATCH_PARTITION).
_CLIENT_ENV = re.compile(r"^(SLURM|SBATCH|SRUN|SALLOC|SQUEUE|SINFO|SCANCEL|SCONTROL)_")


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if Path(p).exists()), None
    )
    if found is None:
        pytest.fail(f"{name} not found: run scripts/test.sh, which installs Debian's slurm-wlm and munge")
    return found


def parse_job(line: str) -> dict[str, str]:
    """`scontrol show job -o <id>`'s one line as {field: value}. Values may hold spaces (Command=, WorkDir=),
    so a field starts only where a space is followed by `Name=` (names hold letters, digits, `:` and `/`:
    `AllocNode:Sid`, `CPUs/Task`). A value that itself holds " name=" (a --comment could) would split."""
    fields = re.split(r" (?=[A-Za-z][A-Za-z0-9:/_]*=)", line.strip())
    return dict(f.split("=", 1) for f in fields if "=" in f)


@dataclass
class SlurmCluster:
    root: Path  # slurm.conf, logs, state, key: kept for a failing test's reader (pytest's tmp)
    run_dir: Path  # sockets only (munged's, slurmstepd's in the spool dirs): a short path, removed on exit
    conf_path: Path
    name: str  # ClusterName
    nodes: tuple[str, ...]  # node names, e.g. ("n1", "n2"); all NodeAddr=127.0.0.1
    cpus_per_node: int
    partitions: tuple[str, ...]  # the first is the default
    env: dict[str, str]  # pass to every subprocess that should see this cluster (and to armlab)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # daemon name -> process

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} -> {r.returncode}: {r.stderr.strip()}\n{self.logs()}")
        return r

    def sbatch(self, *options: str, script: str | None = None, cwd: Path | None = None) -> str:
        """Submit (`sbatch --parsable`): the job id. `script` is the batch script's text (written under
        root); without it, `options` must name a script or hold --wrap."""
        argv = ["sbatch", "--parsable", *options]
        if script is not None:
            path = self.root / f"script-{uuid.uuid4().hex[:8]}.sh"
            path.write_text(script)
            argv.append(str(path))
        out = self.run(*argv, cwd=cwd or self.root).stdout.strip()
        return out.split(";")[0]  # --parsable: "jobid[;cluster]"

    def job(self, jobid: str) -> dict[str, str]:
        """The controller's record of a job (`scontrol show job -o`): JobState, Reason, NodeList, BatchHost,
        ExitCode, Restarts, StartTime, EndTime, ... Finished jobs stay visible for MinJobAge."""
        return parse_job(self.run("scontrol", "show", "job", "-o", str(jobid)).stdout)

    def job_state(self, jobid: str) -> str:
        return self.job(jobid)["JobState"]

    def squeue(self, fmt: str = "%i|%T|%r|%N", *options: str) -> list[list[str]]:
        """`squeue -h -o fmt` split into rows of fields (fmt's `|` separates them). All states are
        listed with `--states=all`."""
        out = self.run("squeue", "-h", "-o", fmt, *options).stdout
        return [line.split("|") for line in out.splitlines() if line.strip()]

    def node_states(self) -> dict[str, str]:
        """{node: state} as sinfo prints it ("idle", "mixed", "alloc", "down*", ...)."""
        out = self.run("sinfo", "-h", "-N", "-o", "%N|%t", check=False).stdout
        return dict(line.split("|") for line in out.splitlines() if "|" in line)

    def wait_job(self, jobid: str, states: Iterable[str] = ENDED, timeout: float = 120) -> dict[str, str]:
        """Poll until the job's state is one of `states` (default: ended); its record. A bounded poll,
        never a sleep: the tests assert what happened, not when."""
        want = set(states)
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(jobid)
            if job["JobState"] in want:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {jobid} still {job['JobState']} after {timeout}s: {job}\n{self.logs()}"
                )
            time.sleep(0.2)

    def logs(self, lines: int = 15) -> str:
        """The daemons' last log lines, for failure messages."""
        out = []
        for log in sorted(self.root.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)


def _write_conf(
    root: Path,
    run_dir: Path,
    name: str,
    nodes: tuple[str, ...],
    cpus: int,
    ctld_port: int,
    node_ports: list[int],
) -> Path:
    user = getpass.getuser()
    host = socket.gethostname().split(".")[0]
    node_lines = [
        f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={cpus} State=UNKNOWN"
        for n, p in zip(nodes, node_ports, strict=True)
    ]
    part_lines = [
        f"PartitionName={p} Nodes=ALL Default={'YES' if i == 0 else 'NO'} MaxTime=INFINITE State=UP"
        for i, p in enumerate(PARTITIONS)
    ]
    (root / "plugstack.conf").write_text("")  # no SPANK plugins from /etc/slurm
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                f"ClusterName={name}",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={ctld_port}",
                f"SlurmdPort={node_ports[0]}",  # per-node Port= below wins
                f"SlurmUser={user}",
                f"SlurmdUser={user}",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={run_dir / 'munge.sock'},cred_expire=10",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={run_dir / '%n'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
                f"SlurmctldLogFile={root / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'slurmd-%n.log'}",
                f"PlugStackConfig={root / 'plugstack.conf'}",
                f"FirstJobId={random.randrange(1000, 9_000_000)}",
                "MailProg=/bin/true",
                "MpiDefault=none",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "JobCompType=jobcomp/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_CPU",
                "SlurmdParameters=config_overrides",
                "ReturnToService=2",
                "JobRequeue=1",  # batch jobs may be requeued (scontrol requeue) unless --no-requeue
                "PreemptType=preempt/none",
                "KillWait=2",  # SIGTERM -> SIGKILL at a time limit or scancel (default 30 s)
                "MinJobAge=86400",  # ended jobs stay in squeue/scontrol for the whole session
                "InactiveLimit=0",
                "Waittime=0",
                # Start a job at submit (batch_sched_delay: 3 s by default), and look at pending jobs
                # every 2 s (a requeued job's BeginTime passing is no event; defaults 60 s and 30 s).
                "SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2",
                *node_lines,
                *part_lines,
                "",
            ]
        )
    )
    return conf


def _popen(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(
    what: str, ok: Callable[[], bool], procs: dict[str, subprocess.Popen], cluster: SlurmCluster
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ok():
        dead = [n for n, p in procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {START_TIMEOUT_S}s"
            raise RuntimeError(f"Slurm test cluster in {cluster.root}: {what}: {why}\n{cluster.logs()}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _own_job_processes(conf: Path) -> list[int]:
    """Processes started through this cluster: their environment names its slurm.conf (slurmd and
    slurmstepd get it from us, every job inherits it from sbatch). Finds job processes that left
    Slurm's process tracking (a detached daemon reparented to init), and nothing of anyone else's."""
    needle = b"\0SLURM_CONF=" + str(conf).encode() + b"\0"
    mine = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in b"\0" + (d / "environ").read_bytes():
                mine.append(int(d.name))
    return mine


def _teardown(cluster: SlurmCluster) -> None:
    """Cancel this cluster's jobs (by id, through its own SLURM_CONF), stop its daemons by pid, then
    kill what is left of its jobs. Removes only its own socket dir (run_dir); root is the caller's."""
    ctld = cluster.procs.get("slurmctld")
    if ctld is not None and ctld.poll() is None:
        with contextlib.suppress(Exception):
            ids = [
                r[0]
                for r in cluster.squeue("%i", "--states=PENDING,RUNNING,SUSPENDED,COMPLETING,CONFIGURING")
            ]
            if ids:
                cluster.run("scancel", *ids, check=False, timeout=30)
                deadline = time.monotonic() + 20
                while cluster.squeue("%i", "--states=RUNNING,COMPLETING") and time.monotonic() < deadline:
                    time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):  # slurmd before slurmctld: no node-down noise
        for key, proc in cluster.procs.items():
            if key.split(":")[0] == name:
                _stop(proc)
    for pid in _own_job_processes(cluster.conf_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(cluster.run_dir, ignore_errors=True)


def _start_daemons(cluster: SlurmCluster, binaries: dict[str, str]) -> None:
    """slurmctld, then one slurmd per node, on free ports; returns once every node is idle. A free port
    can be taken between the probe and the daemon's bind: then it starts again on others."""
    root, conf, env = cluster.root, cluster.conf_path, cluster.env
    for attempt in range(3):
        ports = [free_port() for _ in range(1 + len(cluster.nodes))]
        _write_conf(
            root, cluster.run_dir, cluster.name, cluster.nodes, cluster.cpus_per_node, ports[0], ports[1:]
        )
        daemons = {
            "slurmctld": _popen([binaries["slurmctld"], "-D", "-f", str(conf)], env, root / "slurmctld.out")
        }
        for n in cluster.nodes:
            argv = [binaries["slurmd"], "-D", "-N", n, "-f", str(conf)]
            daemons[f"slurmd:{n}"] = _popen(argv, env, root / f"slurmd-{n}.out")
        cluster.procs.update(daemons)
        try:
            _wait_for(
                "slurmctld answering (scontrol ping)",
                lambda: "is UP" in cluster.run("scontrol", "ping", check=False, timeout=20).stdout,
                daemons, cluster,
            )  # fmt: skip
            _wait_for(
                "every node idle (sinfo)",
                lambda: list(cluster.node_states().values()) == ["idle"] * len(cluster.nodes),
                daemons, cluster,
            )  # fmt: skip
            return
        except RuntimeError:
            logs = "".join(p.read_text(errors="replace") for p in root.glob("*.log"))
            for key, proc in daemons.items():
                _stop(proc)
                del cluster.procs[key]
            if attempt == 2 or "Address already in use" not in logs:
                raise


@contextlib.contextmanager
def slurm_cluster(root: Path, nodes: int = 1, cpus: int = 4) -> Iterator[SlurmCluster]:
    """A running cluster of `nodes` slurmd (n1, n2, ...) with `cpus` CPUs each, all on 127.0.0.1."""
    binaries = {b: _binary(b) for b in (*DAEMONS, *CLIENTS, "munge")}
    root.mkdir(parents=True, exist_ok=True)
    (root / "state").mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)  # munged wants the key private to its user
    conf = root / "slurm.conf"
    cluster = SlurmCluster(
        root=root,
        # Unix socket paths stop at 108 bytes, and slurmstepd's are <spool>/<node>_<jobid>.<stepid>:
        # pytest's tmp paths (.../popen-gw0/test_long_name0/) are too long, so sockets get a short dir.
        run_dir=Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp")),
        conf_path=conf,
        name=f"armlab{uuid.uuid4().hex[:8]}",
        nodes=tuple(f"n{i + 1}" for i in range(nodes)),
        cpus_per_node=cpus,
        partitions=PARTITIONS,
        env={k: v for k, v in os.environ.items() if not _CLIENT_ENV.match(k)} | {"SLURM_CONF": str(conf)},
    )
    try:
        for n in cluster.nodes:
            (cluster.run_dir / n).mkdir()
        sock = cluster.run_dir / "munge.sock"
        cluster.procs["munged"] = _popen(
            # --force: munged wants every dir above its socket searchable by all, and pytest's tmp dirs
            # are 0700; only this user's processes talk to it, so its warning is moot.
            [binaries["munged"], "-F", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}", "--num-threads=2"],
            cluster.env, root / "munged.log",
        )  # fmt: skip
        _wait_for(
            "munged answering",
            lambda: subprocess.run([binaries["munge"], "-n", "-S", str(sock)], capture_output=True).returncode == 0,
            cluster.procs, cluster,
        )  # fmt: skip
        _start_daemons(cluster, binaries)
        yield cluster
    finally:
        _teardown(cluster)
