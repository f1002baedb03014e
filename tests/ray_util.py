"""A real two-node Ray cluster on loopback for tests: `ray start` head + worker, started and stopped here.

The head runs on 127.0.0.2 and the second node on 127.0.0.3 (Ray rewrites 127.0.0.1 to the
machine's interface address; other loopback addresses it keeps), each with one CPU, its own
`--temp-dir` and every port chosen here (GCS, node manager, object manager, metrics export, the
agents, a worker port range), with the dashboard off, so two clusters (two xdist workers, other
people's tests) run side by side. The second node carries a custom resource (`node2`) that the
readiness check pins a task to, so the cluster is up with both nodes before any test runs.

The second node runs in a mount namespace of its own (`unshare -m`, as root) where one directory,
`RayCluster.private`, is covered by an empty tmpfs: a workdir there is one the head sees and the
second node does not, the way a node-local disk looks on a real cluster.

Teardown never runs `ray stop` (it stops every Ray on the machine): each node's `ray start
--block` is the leader of its own session, and every process of that session (the raylet, GCS,
agents, and the workers, which Ray puts in process groups of their own) is killed by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
OBJECT_STORE_BYTES = 100 << 20  # Ray's floor is ~75 MB; the units pass only small results
WORKER_PORTS = 40  # per node: worker processes (one per unit in flight, plus retries)


def free_ports(host: str, n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_range(hosts: tuple[str, ...], n: int) -> int:
    """The first port of `n` consecutive ports free on every host (for a node's workers)."""
    for _ in range(200):
        base = random.randrange(20_000, 30_000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for host in hosts:
                    for port in range(base, base + n):
                        s = stack.enter_context(socket.socket())
                        s.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port range for Ray workers")


def node_args(ip: str, temp_dir: Path, worker_base: int, cpus: int = 1) -> list[str]:
    nm, om, mx, dal, dag, rea = free_ports(ip, 6)
    return [
        "--block",
        "--node-ip-address", ip,
        "--node-manager-port", str(nm),
        "--object-manager-port", str(om),
        "--metrics-export-port", str(mx),
        "--dashboard-agent-listen-port", str(dal),
        "--dashboard-agent-grpc-port", str(dag),
        "--runtime-env-agent-port", str(rea),
        "--min-worker-port", str(worker_base),
        "--max-worker-port", str(worker_base + WORKER_PORTS - 1),
        "--num-cpus", str(cpus),
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--disable-usage-stats",
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip


@dataclass
class RayCluster:
    address: str  # the head's GCS host:port
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    temp_dirs: list[Path] = field(default_factory=list)
    startup_s: float = 0.0
    private: Path | None = None  # seen by the head, not by the second node (None: unshare not permitted)

    def session_pids(self) -> dict[int, int]:
        """Every live process of this cluster (pid -> the session, i.e. the node, it belongs to):
        the sessions its `ray start` processes lead."""
        sids = {p.pid for p in self.procs}
        out = {}
        for proc in psutil.process_iter(["pid", "status"]):
            with contextlib.suppress(OSError, psutil.Error):
                if (sid := os.getsid(proc.pid)) in sids and proc.info["status"] != psutil.STATUS_ZOMBIE:
                    out[proc.pid] = sid
        return out

    def node_pids(self) -> list[list[int]]:
        """Each node's live processes, head first."""
        pids = self.session_pids()
        return [[pid for pid, sid in pids.items() if sid == p.pid] for p in self.procs]

    def log_tail(self) -> str:
        return "\n".join(
            f"== {d}.log\n{Path(f'{d}.log').read_text()[-2000:]}" for d in self.temp_dirs if Path(f"{d}.log").exists()
        )

    def stop(self) -> None:
        """SIGKILL every process of the cluster (nothing of it needs a clean exit: its temp dirs go too)."""
        for pid in self.session_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
        for d in self.temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
            Path(f"{d}.log").unlink(missing_ok=True)
        if self.private is not None:
            shutil.rmtree(self.private, ignore_errors=True)


READY = """
import json, sys, time, ray
ray.init(address=sys.argv[1], _node_ip_address=sys.argv[2], log_to_driver=False, logging_level="ERROR")
deadline = time.time() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2 and time.time() < deadline:
    time.sleep(0.2)
where = ray.remote(num_cpus=0)(lambda: ray.util.get_node_ip_address())
alive = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
print(json.dumps([alive, ray.get(where.options(resources={"node2": 1}).remote())]))
"""


def start_cluster(cpus: int = 1) -> RayCluster:
    """Head on 127.0.0.2, a second node on 127.0.0.3, `cpus` CPUs each; returns once a task has
    run on each (bench/prepare.py starts one too)."""
    t0 = time.monotonic()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    gcs, dash = free_ports(HEAD_IP, 2)
    cluster = RayCluster(f"{HEAD_IP}:{gcs}")
    private = Path(tempfile.mkdtemp(prefix="armlab-ray-private-"))
    hide = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount -t tmpfs armlab "$0" && exec "$@"', str(private)]
    if subprocess.run([*hide, "true"], capture_output=True).returncode == 0:
        cluster.private = private
    else:
        print(f"ray_util: unshare -m not permitted here; {private} stays visible to both nodes")
        hide = []
        private.rmdir()
    try:
        for ip, extra in (
            (HEAD_IP, ["--head", "--port", str(gcs), "--include-dashboard=false", "--dashboard-port", str(dash)]),
            (NODE2_IP, ["--address", cluster.address, "--resources", json.dumps({"node2": 1})]),
        ):
            temp = Path(tempfile.mkdtemp(prefix="armlab-ray-", dir="/tmp"))  # short: Unix socket paths live here
            cluster.temp_dirs.append(temp)
            ports = free_range((HEAD_IP, NODE2_IP), WORKER_PORTS)
            cmd = [ray_bin, "start", *extra, *node_args(ip, temp, ports, cpus)]
            if ip == NODE2_IP:
                cmd = [*hide, *cmd]
            log = open(f"{temp}.log", "wb")  # noqa: SIM115 (the node outlives this function)
            cluster.procs.append(
                subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            )
            if ip == HEAD_IP:
                _wait_port(HEAD_IP, gcs, cluster)
        r = subprocess.run(
            [sys.executable, "-c", READY, cluster.address, HEAD_IP],
            capture_output=True, text=True, timeout=180, env=env,
        )  # fmt: skip
        assert r.returncode == 0, f"{r.stderr[-3000:]}\n{cluster.log_tail()}"
        assert json.loads(r.stdout.strip().splitlines()[-1]) == [[HEAD_IP, NODE2_IP], NODE2_IP], r.stdout
    except BaseException:
        cluster.stop()
        raise
    cluster.startup_s = time.monotonic() - t0
    return cluster


def _wait_port(host: str, port: int, cluster: RayCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=0.5).close()
            return
        assert all(p.poll() is None for p in cluster.procs), cluster.log_tail()
        time.sleep(0.1)
    raise AssertionError(f"Ray head {host}:{port} did not come up\n{cluster.log_tail()}")
