"""The Ray backend of the executor seam: the same units of work as Ray Core tasks on a cluster.

`RayExecutor.map(fn, tasks, on_done)` behaves like `LocalExecutor.map`: `fn(task)` runs as one
Ray task per unit (one CPU each, spread over the nodes), at most `workers` at once (default: the
cluster's CPUs), and `on_done(task, result)` runs here, in the driver, in completion order.
Scoring units (`actors=True`) run on long-lived actors instead, one per CPU or, with `gpus=1`
(the hf scorer on CUDA), one per GPU, so each loads its model once: an idle task worker may be
ended by Ray at any time, and a GPU task's worker process ends after every call (`max_calls=1`
by Ray's default, to free the GPU), which would load the model once per unit.

What a cluster adds, and how it is handled here:
- Units pass paths, not data: the workdir (and a local pool) must be one filesystem that every
  node mounts at the same path (NFS, Lustre, a cloud file share). Checked up front: a probe file
  written here must be read back by a task pinned to every alive node, else prepare refuses.
  Only small results (counts) travel back through Ray.
- A worker that dies (OOM killer, a lost node) has its unit retried (`MAX_RETRIES`); units write
  under temp names renamed into place, so a retried unit writes the same bytes. Errors raised by
  a unit are not retried: they are the same error everywhere, and surface here as themselves.
- Each unit returns the address of the node that ran it; `on_done` runs inside
  `progress.on_node(address)`, so every pass's progress shows per-node rates.

Not Ray Data: its random_shuffle / sort materialise the whole dataset in the object store (its
issue tracker holds OOMs at 1 TB and beyond); armlab's units already bound memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from armlab.errors import ArmlabError, RunFailed
from armlab.progress import on_node

T = TypeVar("T")
R = TypeVar("R")

MAX_RETRIES = 3  # attempts after a worker process or node dies mid-unit
CLOSE_WAIT_S = 600  # after an error, how long close() waits for the units still running
PROBE_PREFIX = ".armlab-ray-probe-"  # check_nodes' files, removed before any unit runs
CONNECT_TIMEOUT_S = 5.0  # the head's GCS port must answer within this
FLAG = "--ray-address / [prepare] ray_address"


def _refuse(address: str, why: str, fix: str) -> ArmlabError:
    return ArmlabError(f"{FLAG} {address!r}: {why}; {fix}")


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ArmlabError(
            "--executor ray needs Ray, which is not installed: pip install 'armlab[ray]' "
            "(on this machine and every node of the cluster), or use --executor local"
        ) from None
    return ray


def resolve_address(address: str | None) -> str:
    """The GCS address to connect to: `address`, else RAY_ADDRESS, else "auto" (a cluster that
    `ray start` started on this machine)."""
    return address or os.environ.get("RAY_ADDRESS") or "auto"


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _check_reachable(address: str) -> None:
    """One TCP connect to the head's GCS port: a wrong address is refused in seconds, not after
    Ray's own minute of retries."""
    if address == "auto":
        return
    hp = _host_port(address)
    if hp is None:
        raise _refuse(address, "not a host:port", "give the head's address, e.g. 10.0.0.1:6379")
    try:
        socket.create_connection(hp, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise _refuse(
            address,
            f"no Ray head answers there ({e.strerror or e})",
            "start the cluster (`ray start --head` on the head node) or fix the address",
        ) from None


def _driver_ip(address: str) -> str | None:
    """The driver's node address: a loopback head (a cluster on this machine, as in tests) is
    this machine's node, and its address is the one to attach to; else Ray finds the node."""
    hp = _host_port(address)
    return hp[0] if hp and hp[0].startswith("127.") else None


_worker_ready = False


def _prepare_worker(cwd: str) -> None:
    """Once per worker process: relative paths mean what they mean in the driver, and Arrow runs
    single-threaded (one unit per CPU; Arrow's own pool would only contend)."""
    global _worker_ready
    if not _worker_ready:
        pa.set_cpu_count(1)
        _worker_ready = True
    if os.getcwd() != cwd:
        with contextlib.suppress(OSError):  # a cwd missing on this node: absolute paths still work
            os.chdir(cwd)


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def run_unit(fn: Callable[[T], R], task: T, cwd: str) -> tuple[R, str]:
    """What every Ray task runs: the unit, and the address of the node that ran it."""
    _prepare_worker(cwd)
    return fn(task), _node_address()


class UnitActor:
    """A long-lived worker (a scorer's): the process, and the model it loaded, stay up between
    units. Ray restarts a dead actor and retries its unit."""

    def run(self, fn: Callable[[T], R], task: T, cwd: str) -> tuple[R, str]:
        return run_unit(fn, task, cwd)


def _probe(paths: list[tuple[str, str]], version: str) -> tuple[str, str | None, list[str]]:
    """On one node: (its address, why it cannot run armlab's units, the `paths` (path, expected
    content or size) it does not see as the driver does). Shipped by value (`check_nodes`), so it
    runs, and says so, where armlab is not installed."""
    import ray

    node = ray.util.get_node_ip_address()
    try:
        import armlab
    except ImportError as e:
        return node, f"cannot import armlab ({e})", []
    if armlab.__version__ != version:
        return node, f"runs armlab {armlab.__version__}, this machine {version}", []
    missing = []
    for path, want in paths:
        try:
            got = Path(path).read_text() if want.startswith("probe:") else str(Path(path).stat().st_size)
        except OSError:
            got = None
        if got != want:
            missing.append(path)
    return node, None, missing


def cluster_hardware(address: str | None, shared: Sequence[Path]) -> tuple[int, int]:
    """The cluster's (CPUs, GPUs), after the checks every Ray run makes (Ray installed, the head
    answers, every node runs armlab and sees `shared`): `armlab score` sizes its scorers by it."""
    probe = RayExecutor(address, None, shared)
    try:
        return probe.cpus, probe.cluster_gpus
    finally:
        probe.close()


class RayExecutor:
    """Units as Ray tasks (or on actors: scoring, `gpus`) on the cluster at `address`."""

    def __init__(
        self,
        address: str | None,
        workers: int | None,
        shared: Sequence[Path] = (),
        gpus: int = 0,
        actors: bool = False,
    ):
        ray = import_ray()
        self.ray = ray
        self.address = resolve_address(address)
        _check_reachable(self.address)
        # Ray's driver sets its own SIGTERM handler (sys.exit); armlab's stop handler must stay
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            ray.init(
                address=self.address,
                _node_ip_address=_driver_ip(self.address),
                logging_level=logging.WARNING,
                log_to_driver=False,  # unit output stays in the nodes' logs; errors come back as errors
                runtime_env={"env_vars": _test_env()} if _test_env() else None,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise _refuse(
                self.address,
                f"cannot connect ({str(e).splitlines()[0][:200]})",
                "run armlab on a node of the cluster (`ray start --address HEAD:PORT` here first)",
            ) from None
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, sigterm)
        resources = ray.cluster_resources()
        self.gpus = gpus
        self.use_actors = actors or gpus > 0
        self.cpus, self.cluster_gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        if gpus and resources.get("GPU", 0) < gpus:
            ray.shutdown()
            raise _refuse(self.address, "the cluster has no GPU", "add GPU nodes, or score on the CPU (--device cpu)")
        slots = int(resources.get("GPU", 0) // gpus) if gpus else int(resources.get("CPU", 1))
        self.workers = max(1, workers or slots)
        self.cwd = os.getcwd()
        self.inflight: dict[Any, Any] = {}
        self.actors: list[Any] = []  # gpus: the actors started so far ...
        self.free: list[Any] = []  # ... those without a unit now
        self.busy: dict[Any, Any] = {}  # unit's ref -> the actor running it
        self.task_fn = ray.remote(run_unit).options(
            num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False, scheduling_strategy="SPREAD"
        )
        try:
            self.check_nodes(shared)
        except BaseException:
            ray.shutdown()
            raise

    def nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.ray.nodes() if n.get("Alive")]

    def check_nodes(self, shared: Sequence[Path]) -> None:
        """Every alive node must run armlab (the same version as here) and see `shared` as this
        machine does: a probe file written into each directory is read back on every node; a
        file must have the same size there."""
        from ray import cloudpickle
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        import armlab

        token = f"probe:{uuid.uuid4().hex}"
        probes: list[Path] = []
        paths: list[tuple[str, str]] = []
        try:
            for p in shared:
                p = Path(p).absolute()
                if p.is_dir():
                    probe = p / f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
                    probe.write_text(token)
                    probes.append(probe)
                    paths.append((str(probe), token))
                else:
                    paths.append((str(p), str(p.stat().st_size)))
            module = sys.modules[__name__]
            cloudpickle.register_pickle_by_value(module)  # `_probe` goes by value: no import of armlab
            try:
                probe_fn = self.ray.remote(_probe)
                refs = [
                    probe_fn.options(
                        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                    ).remote(paths, armlab.__version__)
                    for n in self.nodes()
                ]
            finally:
                cloudpickle.unregister_pickle_by_value(module)
            for node, why, missing in self.ray.get(refs):
                if why:
                    raise ArmlabError(
                        f"--executor ray: Ray node {node} {why}; install this armlab in the Python every "
                        "Ray node runs (pip install 'armlab[ray]' there)"
                    )
                if missing:
                    where = Path(missing[0])
                    where = where.parent if where.name.startswith(PROBE_PREFIX) else where
                    raise ArmlabError(
                        f"--executor ray: Ray node {node} does not see {where} as this machine does; "
                        "the workdir (and a local pool) must be on a filesystem every node mounts at the "
                        "same path (NFS, Lustre, a cloud file share)"
                    )
        finally:
            for probe in probes:
                probe.unlink(missing_ok=True)

    # -- the seam ---------------------------------------------------------------------------------
    def map(self, fn: Callable[[T], R], tasks: Iterable[T], on_done: Callable[[T, R], None]) -> None:
        """On an error, the units still running stay in `inflight`: `close` waits for them (or,
        on a stop, ends the job, and Ray ends its workers)."""
        for task in tasks:
            self.inflight[self._submit(fn, task)] = task
            while len(self.inflight) >= self.workers:
                self._drain(on_done)
        while self.inflight:
            self._drain(on_done)

    def _submit(self, fn: Callable[[T], R], task: T) -> Any:
        if not self.use_actors:
            return self.task_fn.remote(fn, task, self.cwd)
        if not self.free:
            self._start_actor()
        actor = self.free.pop()
        ref = actor.run.remote(fn, task, self.cwd)
        self.busy[ref] = actor
        return ref

    def _start_actor(self) -> None:
        cls = self.ray.remote(UnitActor).options(
            num_cpus=1,
            num_gpus=self.gpus,
            max_restarts=MAX_RETRIES,  # a dead actor comes back ...
            max_task_retries=MAX_RETRIES,  # ... and its unit runs again
            scheduling_strategy="SPREAD",
        )
        self.actors.append(cls.remote())
        self.free.append(self.actors[-1])

    def _drain(self, on_done: Callable[[Any, Any], None]) -> None:
        done, _ = self.ray.wait(list(self.inflight), num_returns=1)
        for ref in done:
            task = self.inflight.pop(ref)
            if ref in self.busy:
                self.free.append(self.busy.pop(ref))
            result, node = self._get(ref)
            with on_node(node):
                on_done(task, result)

    def _get(self, ref: Any) -> Any:
        """The unit's result; a unit's own error is raised as itself (not wrapped in Ray's
        RayTaskError, whose message carries the remote traceback); a unit whose worker died on
        every attempt (the OOM killer, a lost node) fails the run in one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except ray.exceptions.RayError as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            raise RunFailed(
                f"a unit's Ray worker died {MAX_RETRIES + 1} times ({type(e).__name__}: {first}); "
                "the units done are kept: rerun to resume (the nodes' Ray logs say why it died)"
            ) from None

    def close(self, kill: bool = False) -> None:
        """Wait for the units still running (their temp files are then gone), or with `kill` (a
        stop) end now: disconnecting ends this job, and Ray ends every worker process it ran (a
        per-task `ray.cancel(force=True)` racing a unit's reply crashed Ray's core worker)."""
        if not self.ray.is_initialized():
            return
        if not kill:
            deadline = time.monotonic() + CLOSE_WAIT_S
            while self.inflight and time.monotonic() < deadline:
                done, _ = self.ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    self.inflight.pop(ref, None)
        self.inflight.clear()
        self.ray.shutdown()


def _test_env() -> dict[str, str]:
    """Test hooks (ARMLAB_TEST_*) reach the units on every node, as they reach local workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("ARMLAB_TEST_")}
