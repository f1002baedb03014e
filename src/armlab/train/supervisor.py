"""`armlab train`: plan the run, then own it, for every engine.

The supervisor is the process that owns a run once the plan (armlab.train.plan) has refused
everything it could. It holds the arm's data lease for the run's lifetime (released on any exit),
writes state.json before and after the ranks, starts the engine's command in its own session (so
the ranks die with it: PR_SET_PDEATHSIG), tees their output into train.log (and to the engine's
`on_output`), and turns the end into an exit code:

    0    done
    1    a crashed rank (one line naming the rank at fault: armlab.train.failure), or a run that
         diverged (state "diverged": the loss became NaN/inf), or an engine that exited 0 without
         metrics (nothing it printed parsed)
    2    a rank that refused bad input (its one line)
    130  stopped (SIGTERM, SIGUSR1, SIGINT, SIGHUP, `armlab stop`): resumable, state "stopped"
         with `resume_step`

A stop signal does not kill the ranks: the supervisor writes the run's stop request, forwards the
signal to the ranks, and waits (armlab.train.stop.GRACE_S) while they finish their step and save
a checkpoint; a second Ctrl-C, or the grace running out, kills them. On the terminal the ranks'
output is echoed until a traceback starts: the rest goes to train.log only, and the one line that
ends the command says what failed.

On a multi-node run each node runs its own supervisor (`--nnodes N --node-rank K`); node 0's owns
state.json, the lease, metrics and checkpoints, the others (followers) keep their own log
(train.node<K>.log) and exit with the run, reading its end from the ranks' last line.

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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from armlab import runs
from armlab.errors import ArmlabError, Diverged, RunFailed, Stopped
from armlab.progress import console
from armlab.runs import RunState
from armlab.spec import Experiment
from armlab.train.engines import Command, Engine, get_engine, runs_torchrun
from armlab.train.failure import failure_cause
from armlab.train.plan import RunPlan, TrainOptions, plan_run
from armlab.train.stop import GRACE_S, OUTCOME_RE, SIGNALS
from armlab.workdir import leased, read_json

TAIL_LINES = 200  # output lines kept to name a launcher failure that left no rank error


def train(exp: Experiment, arm: str, options: TrainOptions = TrainOptions(), echo: bool = True) -> Path:
    """Train one arm (one seed); returns the run dir. See the module docstring.

    `echo`: also copy the ranks' output to stdout (a lane runner's stdout is its own log: off)."""
    plan = plan_run(exp, arm, options)
    if plan.resume_step is not None and plan.resume_step == plan.config.num_iterations:
        # killed after its final checkpoint: nothing left to train
        console.print(f"train: {plan.run_dir.name} already has its final checkpoint; nothing to resume")
        runs.write_state(plan.run_dir, state=RunState.DONE, error=None, step=plan.resume_step, phase=None)
        return plan.run_dir
    if options.detach:
        detach(plan)
        return plan.run_dir
    return supervise(plan, echo=echo)


def detach(plan: RunPlan) -> None:
    """Start the supervisor of `plan` in a new session and return at once."""
    if not plan.follower:
        runs.write_state(
            plan.run_dir, state=RunState.STARTING, pid=None, started=time.time(), ended=None, error=None
        )
    with open(plan.log_file, "ab") as log:  # the detached supervisor writes its own pid on start
        subprocess.Popen(
            [sys.executable, "-m", "armlab.train.supervisor", str(plan.plan_file)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _take_lease(plan: RunPlan) -> contextlib.AbstractContextManager:
    """The run's shared read lease on its arm (node 0 only: on a multi-node run it covers the shared
    workdir). A dead lease of this same run on this host (a killed supervisor) is taken over by
    `workdir.acquire_lease`; refused if the arm's data is no longer what the run was planned on."""
    if plan.follower:
        return contextlib.nullcontext()
    planned_on = read_json(plan.run_dir / runs.RUN_JSON).get("data_manifest_sha256")
    return leased(plan.data_dir, plan.run, force=plan.force, manifest_sha256=planned_on)


# -- stopping -----------------------------------------------------------------------------------------
class _Stopper:
    """The supervisor's stop signals: the first asks the ranks to stop (the stop request file and
    the signal, forwarded to each rank), with a deadline; a second SIGINT kills them at once."""

    def __init__(self, run_dir: Path, checkpoints: bool) -> None:
        self.run_dir = run_dir
        self.checkpoints = checkpoints  # the engine's ranks save a checkpoint when asked to stop
        self.reason: str | None = None
        self.killed: str | None = None  # how the ranks were killed instead of stopping
        self.proc: subprocess.Popen | None = None
        self.torchrun = False
        self._timer: threading.Timer | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stopper:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        if self._timer is not None:
            self._timer.cancel()

    def attach(self, proc: subprocess.Popen, argv: list[str]) -> None:
        """The ranks' launcher; a stop from now on reaches them (one that came while it started:
        the ranks read its request at their first step's end)."""
        self.proc, self.torchrun = proc, runs_torchrun(argv)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        sig = signal.Signals(signum)
        if self.reason is not None:
            if sig == signal.SIGINT:  # Ctrl-C twice: no checkpoint, now
                self.kill("killed at once by a second SIGINT")
            return  # e.g. Slurm's SIGTERM at the time limit after its --signal=USR1: still stopping
        requested = runs.read_stop_request(self.run_dir)  # `armlab stop` wrote why
        self.reason = requested or sig.name
        with contextlib.suppress(OSError):  # a full disk must not stop the stop: the signal still goes
            if requested is None:
                runs.request_stop(self.run_dir, sig.name)
        what = (
            f"the ranks finish their step and save a checkpoint (up to {GRACE_S} s"
            if self.checkpoints
            else "stopping the ranks (this engine cannot checkpoint on a stop: a restart continues from its last "
            "checkpoint"
        )
        again = "; Ctrl-C again to kill them now" if sig == signal.SIGINT else ""
        console.print(f"train: {self.reason}: {what}{again})")
        self._forward(sig)
        self.deadline(GRACE_S)

    def deadline(self, seconds: float) -> None:
        """Kill the ranks after `seconds` unless they exit first."""
        self._timer = threading.Timer(seconds, self.kill, args=(f"killed after {seconds:.0f} s",))
        self._timer.daemon = True
        self._timer.start()

    def _ranks(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            me = psutil.Process(self.proc.pid)
            return me.children() if self.torchrun else [me]
        except psutil.Error:
            return []

    def _forward(self, sig: signal.Signals) -> None:
        """The signal to each rank directly (not to torchrun, which would tear them down)."""
        for p in self._ranks():
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)

    def kill(self, how: str) -> None:
        """SIGKILL the launcher and every process under it (a rank's own children too)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.killed = how
        kill_tree(self.proc)


def kill_tree(proc: subprocess.Popen) -> None:
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class _Output:
    """What the supervisor learnt from the ranks' output."""

    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES))
    outcome: tuple[str, int, str] | None = None  # the ranks' last line: ("stopped" | "diverged", step, rest)
    diverged: Diverged | None = None  # the engine saw a non-finite loss in the output


def supervise(plan: RunPlan, echo: bool = True, engine: Engine | None = None) -> Path:
    """Own the run: lease, state.json, the ranks' process, train.log; raise on failure or stop.

    `engine`: the plan's engine (default) or an instance of it (a subclass that observes it)."""
    run_dir = plan.run_dir
    engine = engine or get_engine(plan.engine.engine)
    owner = not plan.follower
    if owner:
        runs.clear_rank_errors(run_dir)
        runs.clear_stop_request(run_dir)
    try:
        with _Stopper(run_dir, engine.stops_with_checkpoint) as stopper, _take_lease(plan):
            if owner:
                runs.write_state(
                    run_dir, state=RunState.STARTING, pid=os.getpid(), started=time.time(), ended=None,
                    error=None, step=plan.resume_step or 0, num_iterations=plan.config.num_iterations,
                    phase=None, resume_step=None, stop_reason=None,
                )  # fmt: skip
            if stopper.reason is not None:  # stopped before anything started
                return _conclude(plan, engine, _Output(), 1, stopper)
            cmd = engine.command(plan)
            out, rc = _run_ranks(plan, cmd, engine, stopper, echo)
            engine.on_exit(plan, rc)
            return _conclude(plan, engine, out, rc, stopper)
    except BaseException as e:
        if owner and runs.read_state(run_dir).get("state") in runs.ACTIVE:
            error = str(e).splitlines()[0] if str(e) else type(e).__name__
            runs.write_state(run_dir, state=RunState.FAILED, ended=time.time(), error=error, phase=None)
        raise


def _run_ranks(
    plan: RunPlan, cmd: Command, engine: Engine, stopper: _Stopper, echo: bool
) -> tuple[_Output, int]:
    with open(plan.log_file, "ab") as log:
        if plan.nnodes > 1:
            first, per = plan.node_rank * plan.nproc_per_node, plan.nproc_per_node
            log.write(f"armlab: node {plan.node_rank} of {plan.nnodes} of run {plan.run}: ranks {first}..{first + per - 1}, "
                      f"rendezvous at {plan.rdzv_endpoint}\n".encode())  # fmt: skip
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
        stopper.attach(proc, cmd.argv)
        try:
            out = _tee(proc, log, echo, engine, plan, stopper)
            rc = proc.wait()
        finally:  # an error here (a full disk under train.log): the ranks go down before the lease
            if proc.poll() is None:
                kill_tree(proc)
                proc.wait()
    return out, rc


def _tee(
    proc: subprocess.Popen, log: IO[bytes], echo: bool, engine: Engine, plan: RunPlan, stopper: _Stopper
) -> _Output:
    """Copy the ranks' output into the log (and, until a traceback starts, to stdout) line by line,
    hand each line to the engine. A failing output handler is reported once and then skipped: a
    parser bug must not cost a long run. An output handler that raises `Diverged` ends the run."""
    assert proc.stdout is not None
    out = _Output()
    handler_ok, quiet = True, not echo
    for raw in proc.stdout:
        log.write(raw)
        log.flush()
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        out.tail.append(line)
        quiet = quiet or line.startswith("Traceback (most recent call last)")
        if not quiet:
            sys.stdout.buffer.write(raw)
            sys.stdout.flush()
        if m := OUTCOME_RE.match(line):
            out.outcome = (m.group(1), int(m.group(2)), m.group(3))
        if handler_ok and out.diverged is None:
            try:
                engine.on_output(plan, line)
            except Diverged as e:  # the ranks know nothing of it: end them
                out.diverged = e
                stopper.kill("diverged")
            except Exception as e:  # noqa: BLE001  reported in train.log, the run goes on
                handler_ok = False
                note = f"armlab: {plan.engine.engine} output handler failed ({type(e).__name__}: {e}); ignoring it\n"
                log.write(note.encode())
                log.flush()
    return out


# -- how it ended -------------------------------------------------------------------------------------
def _conclude(plan: RunPlan, engine: Engine, out: _Output, rc: int, stopper: _Stopper) -> Path:
    """Turn the ranks' end into state.json and the command's outcome (see the module docstring)."""
    run_dir, run = plan.run_dir, plan.run
    if plan.follower:
        return _conclude_follower(plan, out, rc, stopper)
    st = runs.read_run_state(run_dir) or runs.StateRecord()
    if out.diverged is not None:
        runs.write_state(
            run_dir, state=RunState.DIVERGED, ended=time.time(), error=str(out.diverged), phase=None
        )
        raise Diverged(f"run {run!r} {out.diverged}; see {plan.log_file}")
    if st.state == RunState.DIVERGED:  # rank 0 wrote it: no checkpoint of the non-finite model was saved
        raise Diverged(f"run {run!r} {st.error}; {_diverged_fix(plan)}")
    if st.state == RunState.STOPPED:  # rank 0 wrote it after the checkpoint
        raise Stopped(stop_message(run, st.step, st.resume_step, st.stop_reason or "a stop"))
    if stopper.reason is not None and rc != 0:  # ranks that could not save (or an engine that cannot)
        steps = engine.checkpoint_steps(run_dir)
        resume = steps[-1] if steps else None
        step = max(st.step, runs.read_metrics(run_dir).last_step or 0)
        killed = f" ({stopper.killed})" if stopper.killed else ""
        runs.write_state(run_dir, state=RunState.STOPPED, ended=time.time(), phase=None, step=step, resume_step=resume,
                         stop_reason=stopper.reason, error=f"stopped by {stopper.reason}{killed}")  # fmt: skip
        raise Stopped(stop_message(run, step, resume, stopper.reason + killed))
    if rc != 0:
        _raise_failure(plan, rc, list(out.tail))
    _check_metrics(plan)
    runs.write_state(
        run_dir, state=RunState.DONE, ended=time.time(), step=plan.config.num_iterations, phase=None
    )
    return run_dir


def _conclude_follower(plan: RunPlan, out: _Output, rc: int, stopper: _Stopper) -> Path:
    node = f"node {plan.node_rank} of run {plan.run!r}"
    if out.outcome is not None and out.outcome[0] == "stopped":
        raise Stopped(
            f"{node} stopped with the run at step {out.outcome[1]}{out.outcome[2]}; node 0 saved the checkpoint"
        )
    if out.outcome is not None and out.outcome[0] == "diverged":
        raise Diverged(f"{node}: the run diverged at step {out.outcome[1]}{out.outcome[2]}")
    if stopper.reason is not None and rc != 0:
        raise Stopped(f"{node} stopped by {stopper.reason}; see node 0 for where it resumes")
    if rc != 0:
        _raise_failure(plan, rc, list(out.tail))
    return plan.run_dir


def stop_message(run: str, step: int, resume: int | None, reason: str) -> str:
    """What a stop says about where the run continues; never a silent restart from step 0."""
    where = f"stopped at step {step} by {reason}"
    if resume is None:
        if step == 0:
            return f"run {run!r} stopped by {reason} before its first step: a restart begins from step 0"
        return f"run {run!r} {where} before its first checkpoint: a restart begins from step 0"
    again = f" (steps {resume + 1}-{step} are trained again)" if resume < step else ""
    return (
        f"run {run!r} {where}; checkpoint step {resume} is saved: a restart (`armlab train ... --resume`, "
        f"or `armlab run` again) continues from step {resume}{again}"
    )


def _diverged_fix(plan: RunPlan) -> str:
    return (
        f"no checkpoint of the non-finite model was kept; lower the learning rates (train.matrix_lr, "
        f"train.embedding_lr, ...) and start a new run (--run-name, or --force); see {plan.log_file}"
    )


def _check_metrics(plan: RunPlan) -> None:
    """A run that exited 0 must have logged its steps: an engine whose output did not parse (a
    nanochat fork that prints other lines) has not trained as far as anyone can tell."""
    last = runs.read_metrics(plan.run_dir).last_step
    n = plan.config.num_iterations
    if last is not None and last >= n:
        return
    what = (
        "no step lines parsed from its output"
        if last is None
        else f"its metrics end at step {last} of {n} (the later step lines did not parse)"
    )
    error = f"the {plan.engine.engine} engine exited 0 but {what}; see {plan.log_file}"
    runs.write_state(plan.run_dir, state=RunState.FAILED, ended=time.time(), error=error, phase=None)
    raise RunFailed(f"run {plan.run!r}: {error}")


def _raise_failure(plan: RunPlan, rc: int, tail: list[str]) -> None:
    """One line naming the rank at fault (armlab.train.failure), in state.json and the exception."""
    run_dir = plan.run_dir
    detail = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    cause = failure_cause(runs.read_rank_errors(run_dir), tail, detail)
    if not plan.follower:
        runs.write_state(run_dir, state=RunState.FAILED, ended=time.time(), error=cause.line, phase=None)
    if cause.bad_input:
        raise ArmlabError(cause.line)
    raise RunFailed(f"{cause.line} (see {plan.log_file})")


def main(plan_path: str) -> int:
    """The detached supervisor: `python -m armlab.train.supervisor <run dir>/plan.json`."""
    try:
        supervise(RunPlan.read(plan_path), echo=False)
    except (ArmlabError, RunFailed) as e:
        label = "error: " if isinstance(e, ArmlabError) else "" if isinstance(e, Stopped) else "failed: "
        print(f"armlab: {label}{e}", file=sys.stderr, flush=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
