"""Where prepare's units of work run: one small interface, `Executor.map(fn, tasks, on_done)`.

The passes only ever call `map`: each task is a picklable value, `fn(task)` runs somewhere (this
process, a worker process, later perhaps a cluster node) and `on_done(task, result)` runs here, in
the parent, in completion order. Tasks are drawn from the iterable only when a slot is free, so
an iterable that blocks (waiting for a download) holds back only the work behind it.

`open_executor` picks the backend: `LocalExecutor` (here) or `RayExecutor` (`ray_executor`, the
units as Ray tasks on a cluster's nodes, imported only when asked for). A backend is one class
with `workers`, `map` and `close`; the passes never know which one runs them.

`LocalExecutor` runs tasks inline (workers=1) or on a pool of worker processes forked up front.
Its workers die with their parent (PR_SET_PDEATHSIG on Linux, and a parent-pid watch where that
is missing), ignore SIGINT (the parent owns shutdown: a Ctrl-C in a terminal reaches the whole
process group, and worker tracebacks would bury the one line that matters), take SIGTERM's
default (they are killed, not stopped: the parent is what stops), and run Arrow
single-threaded (one process per core; Arrow's own pool would only contend).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pyarrow as pa

T = TypeVar("T")
R = TypeVar("R")

PR_SET_PDEATHSIG = 1
PARENT_WATCH_S = 1.0


class Executor(Protocol):
    """Runs `fn(task)` for each task, at most `workers` at once; `on_done(task, result)` in the caller."""

    workers: int

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], on_done: Callable[[T, R], None]) -> None: ...

    def close(self, kill: bool = False) -> None: ...


def open_executor(
    kind: str,
    workers: int | None,
    ray_address: str | None = None,
    shared: Sequence[Path] = (),
    gpus: int = 0,
    actors: bool = False,
) -> Executor:
    """The executor `kind` names ("local" | "ray"), running up to `workers` units at once (local:
    default the CPU count; ray: the cluster's CPUs, or its GPUs / `gpus`). `shared`: paths the
    units read or write, which every Ray node must see as this machine does (checked up front);
    `gpus`: GPUs per unit; `actors`: on Ray, units run on long-lived actors (a scorer's model is
    loaded once per actor) instead of tasks."""
    if kind == "ray":
        from armlab.data.prepare.ray_executor import RayExecutor

        return RayExecutor(ray_address, workers, shared, gpus, actors)
    return LocalExecutor(max(1, workers or os.cpu_count() or 1))


class LocalExecutor:
    """Tasks inline (workers=1) or on forked worker processes of this machine."""

    def __init__(self, workers: int):
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        if workers > 1:
            # On Linux the workers are forked, all of them now, before this process starts any
            # thread (progress bars, downloads): a fork copies only the forking thread, so forking
            # later could copy a lock some other thread holds. Forked workers start instantly with
            # everything imported; a forkserver would spend ~0.3 s re-importing pyarrow first, and
            # spawn ~1 s per worker. A caller that already runs threads (an app embedding armlab)
            # gets a forkserver; other platforms their default (spawn on macOS, where fork is unsafe).
            linux = sys.platform.startswith("linux")
            method = ("fork" if threading.active_count() == 1 else "forkserver") if linux else None
            if method == "fork":
                # The objects alive now go to the collector's permanent generation, which the
                # forked workers inherit: their collections skip them (they were ~2% of prepare's
                # CPU) and never write to the shared pages (Python's gc.freeze docs). This process
                # unfreezes once they are forked, so its own garbage stays collectable.
                gc.freeze()
            ctx = multiprocessing.get_context(method)
            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=ctx,
                initializer=_worker_init,
                # a forked worker's parent is this process; a forkserver's child's is the server
                initargs=(os.getpid() if method == "fork" else None,),
            )
            if method == "fork":
                # submit() forks every worker at once under the fork method; wait for them here
                for f in [self.pool.submit(os.getpid) for _ in range(workers)]:
                    f.result()
                gc.unfreeze()

    def map(self, fn: Callable[[T], R], tasks: Iterable[T], on_done: Callable[[T, R], None]) -> None:
        if self.pool is None:
            for task in tasks:
                on_done(task, fn(task))
            return
        inflight: dict[Future[Any], Any] = {}
        try:
            for task in tasks:
                inflight[self.pool.submit(fn, task)] = task
                while len(inflight) >= self.workers:
                    self._drain(inflight, on_done)
            while inflight:
                self._drain(inflight, on_done)
        except BaseException:
            for f in inflight:
                f.cancel()
            raise

    @staticmethod
    def _drain(inflight: dict[Future[Any], Any], on_done: Callable[[Any, Any], None]) -> None:
        done, _ = wait(list(inflight), return_when=FIRST_COMPLETED)
        for f in done:
            on_done(inflight.pop(f), f.result())

    def close(self, kill: bool = False) -> None:
        """Wait for the running tasks and the workers to end; `kill` (on a signal) stops them now."""
        if self.pool is None:
            return
        if kill:
            for p in list((self.pool._processes or {}).values()):  # no public API for this
                with contextlib.suppress(Exception):
                    p.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent: int | None) -> None:
    pa.set_cpu_count(1)  # one process per core: Arrow's own thread pool would only contend
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in (signal.SIGTERM, signal.SIGHUP):  # not the parent's "stop prepare" handlers
        signal.signal(s, signal.SIG_DFL)
    die_with_parent(parent or os.getppid())


def die_with_parent(parent: int) -> None:
    """Exit when `parent` exits, however it dies (a kill -9 of prepare must not leave 150 MB
    workers behind). Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere a daemon
    thread polls the parent pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
            return

    def watch() -> None:
        while True:
            threading.Event().wait(PARENT_WATCH_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="armlab-parent-watch", daemon=True).start()


def kill_point(point: str) -> None:
    """Test hook for retried units: with ARMLAB_TEST_KILL=<point>:<dir>, the first unit to reach
    `point` (mid-unit, with a temp file half-written) writes its pid to <dir>/pid and waits there
    for the test to kill its process; every arrival appends its pid to <dir>/arrivals."""
    spec = os.environ.get("ARMLAB_TEST_KILL", "")
    if not spec.startswith(f"{point}:"):
        return
    d = Path(spec.split(":", 1)[1])
    with open(d / "arrivals", "a") as f:
        f.write(f"{os.getpid()}\n")
    try:
        os.close(os.open(d / "claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return  # the retry (or any other unit) goes on
    (d / "pid.tmp").write_text(str(os.getpid()))
    os.replace(d / "pid.tmp", d / "pid")
    threading.Event().wait(120)  # killed long before this ends
