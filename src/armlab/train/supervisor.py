"""`armlab train`: plan the run, then own it, for every engine.

The supervisor is the process that owns a run once the plan (armlab.train.plan) has refused
everything it could. It holds the arm's data lease for the run's lifetime (released on any exit,
SIGTERM included), writes state.json before and after the ranks, starts the engine's command in
its own session (so the ranks die with it: PR_SET_PDEATHSIG, and a signal stops their whole
group), tees their output into train.log (and to the engine's `on_output`), and turns the end
into an exit code: 0 done; 1 a crashed rank (with that rank's error line, or the launcher's last
error line when no rank left one) or a stop by SIGTERM / SIGINT / SIGHUP (state "stopped",
resumable); 2 a rank that refused bad input.

`detach` re-runs the supervisor as `python -m armlab.train.supervisor <run dir>/plan.json` in a
new session (setsid) with output to train.log, so it survives the SSH session; state.json holds
its pid.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from armlab import runs
from armlab.errors import ArmlabError, RunFailed
from armlab.progress import console
from armlab.runs import RunState
from armlab.spec import Experiment
from armlab.train.engines import Engine, get_engine
from armlab.train.plan import RunPlan, TrainOptions, plan_run
from armlab.workdir import leased, read_json

STOP_GRACE_S = 30  # after SIGTERM, how long the ranks get before SIGKILL
TAIL_LINES = 200  # output lines kept to name a launcher failure that left no rank error


class Stopped(Exception):
    """The supervisor got SIGTERM / SIGINT / SIGHUP."""


def train(exp: Experiment, arm: str, options: TrainOptions = TrainOptions(), echo: bool = True) -> Path:
    """Train one arm (one seed); returns the run dir. See the module docstring.

    `echo`: also copy the ranks' output to stdout (a lane runner's stdout is its own log: off)."""
    plan = plan_run(exp, arm, options)
    if plan.resume_step is not None and plan.resume_step == plan.config.num_iterations:
        # killed after its final checkpoint: nothing left to train
        console.print(f"train: {plan.run_dir.name} already has its final checkpoint; nothing to resume")
        runs.write_state(plan.run_dir, state=RunState.DONE, error=None, step=plan.resume_step)
        return plan.run_dir
    if options.detach:
        detach(plan)
        return plan.run_dir
    return supervise(plan, echo=echo)


def detach(plan: RunPlan) -> None:
    """Start the supervisor of `plan` in a new session and return at once."""
    runs.write_state(
        plan.run_dir, state=RunState.STARTING, pid=None, started=time.time(), ended=None, error=None
    )
    with open(
        plan.run_dir / runs.TRAIN_LOG, "ab"
    ) as log:  # the detached supervisor writes its own pid on start
        subprocess.Popen(
            [sys.executable, "-m", "armlab.train.supervisor", str(plan.plan_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _take_lease(plan: RunPlan) -> contextlib.AbstractContextManager:
    """The run's shared read lease on its arm. A dead lease of this same run on this host (a killed
    supervisor) is taken over by `workdir.acquire_lease`; refused if the arm's data is no longer what
    the run was planned on (a prepare swapped it in since)."""
    planned_on = read_json(plan.run_dir / runs.RUN_JSON).get("data_manifest_sha256")
    return leased(plan.data_dir, plan.run, force=plan.force, manifest_sha256=planned_on)


def supervise(plan: RunPlan, echo: bool = True, engine: Engine | None = None) -> Path:
    """Own the run: lease, state.json, the ranks' process, train.log; raise on failure.

    `engine`: the plan's engine (default) or an instance of it (a subclass that observes it)."""
    run_dir = plan.run_dir
    engine = engine or get_engine(plan.engine.engine)
    runs.clear_rank_errors(run_dir)

    def stop(signum: int, _frame: Any) -> None:
        for s in old_handlers:  # a second signal must not interrupt the orderly shutdown
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        with _take_lease(plan):
            runs.write_state(
                run_dir, state=RunState.STARTING, pid=os.getpid(), started=time.time(), ended=None, error=None,
                step=plan.resume_step or 0, num_iterations=plan.config.num_iterations,
            )  # fmt: skip
            cmd = engine.command(plan)
            with open(run_dir / runs.TRAIN_LOG, "ab") as log:
                try:
                    proc = subprocess.Popen(
                        cmd.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        env={**os.environ, **cmd.env}, cwd=cmd.cwd, start_new_session=True,
                        preexec_fn=runs.die_with_parent,
                    )  # fmt: skip
                except OSError as e:
                    where = f" in {cmd.cwd}" if cmd.cwd else ""
                    raise ArmlabError(
                        f"cannot start the {plan.engine.engine} engine's command {cmd.argv[0]}{where}: {e.strerror}"
                    ) from None
                try:
                    tail = _tee(proc, log, echo, engine, plan)
                    rc = proc.wait()
                finally:  # on a signal or an error, the ranks go down before the lease is released
                    _terminate(proc)
            engine.on_exit(plan, rc)
            if rc == 0:
                runs.write_state(
                    run_dir, state=RunState.DONE, ended=time.time(), step=plan.config.num_iterations
                )
                return run_dir
            _raise_failure(run_dir, rc, tail)
    except Stopped as e:
        runs.write_state(run_dir, state=RunState.STOPPED, ended=time.time(), error=f"stopped by {e}")
        raise RunFailed(f"run {plan.run!r} stopped by {e}; resume with `armlab train ... --resume`") from None
    except BaseException as e:
        if runs.read_state(run_dir).get("state") not in (RunState.FAILED, RunState.STOPPED):
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            runs.write_state(run_dir, state=RunState.FAILED, ended=time.time(), error=error)
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return run_dir


def _tee(proc: subprocess.Popen, log: IO[bytes], echo: bool, engine: Engine, plan: RunPlan) -> list[bytes]:
    """Copy the ranks' output into train.log (and stdout) line by line, hand each line to the
    engine; returns the last lines. A failing output handler is reported once and then skipped:
    a parser bug must not cost a long run."""
    assert proc.stdout is not None
    tail: collections.deque[bytes] = collections.deque(maxlen=TAIL_LINES)
    handler_ok = True
    for line in proc.stdout:
        tail.append(line)
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        if handler_ok:
            try:
                engine.on_output(plan, line.decode("utf-8", "replace").rstrip("\r\n"))
            except Exception as e:  # noqa: BLE001  reported in train.log, the run goes on
                handler_ok = False
                note = f"armlab: {plan.engine.engine} output handler failed ({type(e).__name__}: {e}); ignoring it\n"
                log.write(note.encode())
                log.flush()
    return list(tail)


def _terminate(proc: subprocess.Popen) -> None:
    """SIGTERM the ranks' process group, then SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def error_line(lines: Iterable[bytes]) -> str | None:
    """The last line of the ranks' output that names an error: torchrun's own failures (a rendezvous
    that could not bind, a rank killed by a signal) and engines whose ranks write no rank error
    file leave only this."""
    found = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if any(k in line for k in ("Error", "error:", "Exception", "received by PID")):
            found = line
    return found[:300] if found else None


def _raise_failure(run_dir: Path, rc: int, tail: Iterable[bytes] = ()) -> None:
    errors = runs.read_rank_errors(run_dir)
    if errors:
        first = errors[0]
        runs.write_state(
            run_dir, state=RunState.FAILED, ended=time.time(), error=f"rank {first.rank}: {first.error}"
        )
        if first.kind == "bad_input":
            raise ArmlabError(first.error)
        raise RunFailed(f"rank {first.rank} failed: {first.error} (traceback in {run_dir / runs.TRAIN_LOG})")
    detail = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    runs.write_state(
        run_dir, state=RunState.FAILED, ended=time.time(), error=f"training processes failed ({detail})"
    )
    cause = error_line(tail)
    raise RunFailed(
        f"training processes failed ({detail}){': ' + cause if cause else ''}; see {run_dir / runs.TRAIN_LOG}"
    )


def main(plan_path: str) -> int:
    """The detached supervisor: `python -m armlab.train.supervisor <run dir>/plan.json`."""
    try:
        supervise(RunPlan.read(plan_path), echo=False)
    except (ArmlabError, RunFailed) as e:
        print(
            f"armlab: {'error' if isinstance(e, ArmlabError) else 'failed'}: {e}", file=sys.stderr, flush=True
        )
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
