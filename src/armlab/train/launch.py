"""`armlab train`: check everything, then run one arm's training on 1..N processes.

The launcher is the process that owns a run: it refuses bad input before any rank starts
(unprepared arm, missing or foreign tokenizer, a total batch the ranks cannot split, more GPUs
than visible, a layout that cannot feed the ranks, a taken master port, a checkpoint from
another config), holds the arm's data lease for the run's lifetime (released on any exit,
SIGTERM included), writes run.json / state.json, starts the ranks (directly for one process,
through torchrun with a static rendezvous on 127.0.0.1 for several), copies their output into
train.log, and turns a crashed rank into exit 1 with that rank's error line.

`detach=True` re-runs the launcher as `python -m armlab.train.launch <run dir>/launch.json` in a
new session (setsid) with output to train.log, so it survives the SSH session; state.json holds
its pid.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from armlab import __version__
from armlab.budget import grad_accum_steps, model_dim, training_budget
from armlab.errors import ArmlabError, RunFailed
from armlab.progress import console
from armlab.spec import Experiment, ModelSpec, TrainSpec, parse_experiment
from armlab.train import checkpoint, rundir
from armlab.workdir import (
    atomic_write_json,
    leased,
    open_workdir,
    pid_alive,
    read_json,
    read_lease,
    run_name,
)

STOP_GRACE_S = 30  # after SIGTERM, how long the ranks get before SIGKILL
MODEL_KEYS = set(ModelSpec.model_fields)
TRAIN_KEYS = set(TrainSpec.model_fields) - {"seeds"}


class Stopped(Exception):
    """The launcher got SIGTERM / SIGINT / SIGHUP."""


def apply_overrides(exp: Experiment, overrides: dict[str, Any]) -> Experiment:
    """The experiment with command-line overrides of [model] / [train] keys (None = not given).

    `num_iterations` or `tokens` replace the file's horizon. Overrides change the fingerprint,
    so runs with and without them never compare by accident.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - MODEL_KEYS - TRAIN_KEYS)
    if unknown:
        raise ArmlabError(
            f"unknown override(s) {', '.join(unknown)}; allowed: {', '.join(sorted(MODEL_KEYS | TRAIN_KEYS))}"
        )
    if not given:
        return exp
    data = exp.model_dump(mode="json")
    for horizon in ("num_iterations", "tokens", "target_param_data_ratio"):
        if horizon in given:
            data["train"].update(num_iterations=None, tokens=None, target_param_data_ratio=None)
    for k, v in given.items():
        data["model" if k in MODEL_KEYS else "train"][k] = v
    return parse_experiment(data, "command-line overrides")


def resolve_devices(num_gpus: int | None, device: str | None, nproc: int | None) -> tuple[str, int]:
    """(device kind, world size): --num-gpus N means N CUDA ranks; --device cpu --nproc N, N CPU ranks."""
    import torch

    if num_gpus is not None and device == "cpu":
        raise ArmlabError("--num-gpus is for CUDA; for CPU ranks use --device cpu --nproc N")
    if num_gpus is not None and nproc is not None and num_gpus != nproc:
        raise ArmlabError(f"--num-gpus {num_gpus} and --nproc {nproc} disagree; give one of them")
    if device is None:
        device = "cuda" if (num_gpus is not None or torch.cuda.is_available()) else "cpu"
    if device not in ("cpu", "cuda"):
        raise ArmlabError(f"--device {device!r}: use cpu or cuda")
    # `is not None`, not `or`: --nproc 0 is a mistake to refuse, not a request for the default
    world = num_gpus if num_gpus is not None else nproc if nproc is not None else 1
    if world < 1:
        raise ArmlabError(f"--num-gpus/--nproc must be >= 1, got {world}")
    if device == "cuda":
        visible = torch.cuda.device_count()
        if world > visible:
            where = os.environ.get("CUDA_VISIBLE_DEVICES")
            extra = f" (CUDA_VISIBLE_DEVICES={where})" if where is not None else ""
            raise ArmlabError(
                f"--num-gpus {world} but {visible} GPU{'s' if visible != 1 else ''} visible{extra}; "
                + (f"use --num-gpus {visible}" if visible else "use --device cpu")
            )
    return device, world


def check_port(port: int) -> int:
    """Refuse a master port something already listens on (two runs on one port hang)."""
    if not 0 < port < 65536:
        raise ArmlabError(f"--master-port {port}: must be in 1..65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ArmlabError(
                f"--master-port {port} is in use on this host (another run?); pick another port or omit "
                "--master-port to use a free one"
            ) from None
    return port


def _complete_manifest(directory: Path, fix: str, what: str) -> bytes:
    try:
        raw = (directory / "manifest.json").read_bytes()
        complete = read_json(directory / "manifest.json").get("complete")
    except FileNotFoundError:
        raw, complete = b"", False
    if not complete:
        raise ArmlabError(f"{what} is not prepared (no complete manifest.json in {directory}); run `{fix}`")
    return raw


def _take_lease(
    data_dir: Path, run: str, force: bool, manifest_sha256: str | None = None
) -> contextlib.AbstractContextManager:
    """The data lease; a dead lease of this same run on this host (a killed launcher) is taken over.
    Refused if the data is no longer what the run was planned on (a prepare swapped it since)."""
    lease = read_lease(data_dir)
    if lease is not None and lease.local and lease.run == run and not pid_alive(lease.pid):
        console.print(f"train: taking over the stale lease of run {run!r} (pid {lease.pid} is gone)")
        force = True
    return leased(data_dir, run, force=force, manifest_sha256=manifest_sha256)


def plan_run(
    exp: Experiment,
    arm: str,
    seed: int | None = None,
    run_name_: str | None = None,
    num_gpus: int | None = None,
    device: str | None = None,
    nproc: int | None = None,
    master_port: int | None = None,
    resume: bool = False,
    force: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Every check that can fail on bad input, then run.json and the launch plan (no rank started)."""
    from armlab.tokenizer import load_experiment_tokenizer
    from armlab.train.loader import check_feeds

    exp.arm(arm)  # unknown arm: error naming the arms
    eff = apply_overrides(exp, overrides)
    seed = eff.train.seeds[0] if seed is None else seed
    run = run_name_ or run_name(arm, seed)
    wd = open_workdir(exp, create=False)
    data_dir, run_dir = wd.data_dir(arm), wd.run_dir(arm, run)
    data_manifest = _complete_manifest(data_dir, f"armlab prepare EXP --arm {arm}", f"arm {arm!r}")
    _complete_manifest(wd.eval_dir, "armlab prepare EXP", "the shared eval set")
    tok = load_experiment_tokenizer(exp)
    if eff.train.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ArmlabError(
            "train.wandb_project is set but wandb is not installed: pip install 'armlab[wandb]'"
        )
    kind, world = resolve_devices(num_gpus, device, nproc)
    budget = training_budget(eff, vocab_size=tok.vocab_size)
    accum = grad_accum_steps(
        budget.total_batch_size, eff.train.device_batch_size, eff.model.max_seq_len, world
    )
    check_feeds(data_dir, world)  # other runs reading this arm are no conflict: read leases are shared
    # No port given: torchrun binds port 0 itself (c10d rendezvous), so the kernel hands out a free
    # port atomically; probing for a free port here and passing it on would race other processes.
    port = check_port(master_port) if master_port is not None else None

    config = {
        "depth": eff.model.depth,
        "model_dim": model_dim(eff.model),
        "max_seq_len": eff.model.max_seq_len,
        "vocab_size": tok.vocab_size,
        "n_params": budget.params.total,
        "scaling_params": budget.params.scaling,
        "flops_per_token": budget.flops_per_token,
        "total_batch_size": budget.total_batch_size,
        "device_batch_size": eff.train.device_batch_size,
        "grad_accum_steps": accum,
        "num_iterations": budget.num_iterations,
        "tokens": budget.tokens,
        "world_size": world,
        "device": kind,
        "dtype": "bfloat16" if kind == "cuda" else "float32",
        "compile": bool(eff.train.compile and kind == "cuda"),
    }
    run_json = {
        "experiment": exp.name,
        "arm": arm,
        "seed": seed,
        "run": run,
        "fingerprint": eff.fingerprint(),
        "comparability": eff.comparability(),
        "tokenizer_fingerprint": tok.fingerprint,
        "data_manifest_sha256": hashlib.sha256(data_manifest).hexdigest(),
        "config": config,
        "overrides": {k: v for k, v in overrides.items() if v is not None},
        "created": time.time(),
        "host": socket.gethostname(),
        "armlab_version": __version__,
    }
    resume_step = _check_run_dir(run_dir, run_json, resume, force)
    _check_repeats(data_manifest, budget.tokens, arm, eff.train.allow_repeat)

    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        atomic_write_json(run_dir / rundir.RUN, run_json)
    plan = {
        "experiment": eff.model_dump(mode="json"),
        "arm": arm,
        "seed": seed,
        "run": run,
        "run_dir": str(run_dir),
        "data_dir": str(data_dir),
        "eval_dir": str(wd.eval_dir),
        "tokenizer_dir": str(wd.tokenizer_dir),
        "device": kind,
        "world_size": world,
        "master_port": port,
        "resume_step": resume_step,
        "fingerprint": run_json["fingerprint"],
        "config": config,
        "force": force,
    }
    atomic_write_json(run_dir / rundir.PLAN, plan)
    return plan


def _check_run_dir(run_dir: Path, new: dict[str, Any], resume: bool, force: bool) -> int | None:
    """The checkpoint step to resume from (None: start fresh); refuses mismatched or clobbering runs."""
    exists = (run_dir / rundir.RUN).is_file()
    if exists and not resume:
        state = rundir.read_state(run_dir)
        if (
            state.get("state") in ("starting", "running")
            and state.get("pid")
            and pid_alive(int(state["pid"]))
        ):
            raise ArmlabError(
                f"{run_dir}: run {new['run']!r} is live (pid {state['pid']}); watch it with `armlab status EXP`, "
                "stop it with `armlab stop EXP`, or start another with --run-name NAME"
            )
        if not force:
            raise ArmlabError(
                f"{run_dir} already holds run {new['run']!r}; pass --resume to continue it, --run-name NAME for a "
                "new run, or --force to delete it and start over"
            )
        shutil.rmtree(run_dir)
        return None
    if not resume or not exists:
        if resume:
            console.print(f"train: nothing to resume in {run_dir}; starting a new run")
        return None
    old = read_json(run_dir / rundir.RUN)
    state = rundir.read_state(run_dir)
    if state.get("state") in ("starting", "running") and state.get("pid") and pid_alive(int(state["pid"])):
        raise ArmlabError(f"{run_dir}: run is still live (pid {state['pid']}); it cannot be resumed twice")
    diffs = [
        k for k in ("fingerprint", "tokenizer_fingerprint", "data_manifest_sha256") if old.get(k) != new[k]
    ]
    diffs += [
        f"config.{k}"
        for k in (
            "depth",
            "n_params",
            "total_batch_size",
            "device_batch_size",
            "num_iterations",
            "world_size",
        )
        if old["config"].get(k) != new["config"][k]
    ]
    if diffs:
        raise ArmlabError(
            f"{run_dir}: cannot resume: its checkpoint is from another config (differs in {', '.join(diffs)}); "
            "resume with the original settings or start a new run with --run-name"
        )
    checkpoint.remove_partial(run_dir)
    steps = checkpoint.list_steps(run_dir)
    if not steps:
        console.print(f"train: {run_dir} has no checkpoint yet; restarting it from step 0")
        rundir.truncate_metrics(run_dir, 0)
        return None
    step = steps[-1]
    rundir.truncate_metrics(run_dir, step)
    return step


def _check_repeats(manifest_raw: bytes, tokens: int, arm: str, allow: bool) -> None:
    """DESIGN.md invariant 7: a run that would see its arm's data more than once is refused unless
    repeats are allowed (`--allow-repeat` / `train.allow_repeat`), and then it is said plainly."""
    import json

    manifest = json.loads(manifest_raw)
    held = manifest.get("tokens")
    approx = held is None
    if held is None:
        held = int(manifest.get("chars", 0)) // 4  # ~4 chars a token for English BPE
    if not held or tokens <= held:
        return
    what = (
        f"the run consumes {tokens:,} tokens but arm {arm!r} holds {'~' if approx else ''}{held:,}: "
        f"its data would repeat about {tokens / held:.1f} times"
    )
    if not allow:
        raise ArmlabError(
            f"{what}; prepare more data for it (raise ratio or max_tokens), shorten the run, "
            f"or pass --allow-repeat (train.allow_repeat = true)"
        )
    console.print(f"[yellow]train: {what} (allowed; epochs are logged)[/]")


def _command(plan: dict[str, Any]) -> list[str]:
    worker = ["-m", "armlab.train.worker", str(Path(plan["run_dir"]) / rundir.PLAN)]
    if plan["world_size"] == 1:
        return [sys.executable, *worker]
    if plan["master_port"] is None:
        rendezvous = ["--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "--local-addr=127.0.0.1"]
    else:
        rendezvous = ["--master-addr=127.0.0.1", f"--master-port={plan['master_port']}"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", "--node-rank=0", f"--nproc-per-node={plan['world_size']}",
        *rendezvous, "--max-restarts=0", *worker,
    ]  # fmt: skip


def _die_with_parent() -> None:
    from armlab.train.worker import die_with_parent

    die_with_parent()


def run_plan(plan: dict[str, Any], echo: bool = True) -> Path:
    """Own the run: lease, state.json, the ranks' process, train.log; raise on failure."""
    run_dir = Path(plan["run_dir"])
    shutil.rmtree(run_dir / rundir.ERRORS, ignore_errors=True)

    def stop(signum: int, _frame: Any) -> None:
        for s in old_handlers:  # a second signal must not interrupt the orderly shutdown
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        planned_on = read_json(run_dir / rundir.RUN).get("data_manifest_sha256")
        with _take_lease(Path(plan["data_dir"]), plan["run"], plan["force"], planned_on):
            rundir.write_state(
                run_dir, state="starting", pid=os.getpid(), started=time.time(), ended=None, error=None,
                step=plan["resume_step"] or 0, num_iterations=plan["config"]["num_iterations"],
            )  # fmt: skip
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            if plan["device"] == "cpu":
                # One core is left to the loader's tokenizer threads: an oversubscribed OpenMP pool
                # spin-waits and runs several times slower (measured: 4x on 2 busy cores).
                threads = max(1, (os.cpu_count() or 1) // plan["world_size"] - 1)
                env.setdefault("OMP_NUM_THREADS", str(threads))
            with open(run_dir / rundir.LOG, "ab") as log:
                proc = subprocess.Popen(
                    _command(plan), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, preexec_fn=_die_with_parent,
                )  # fmt: skip
                assert proc.stdout is not None
                tail: collections.deque[bytes] = collections.deque(maxlen=200)
                try:
                    for line in proc.stdout:
                        tail.append(line)
                        log.write(line)
                        log.flush()
                        if echo:
                            sys.stdout.buffer.write(line)
                            sys.stdout.flush()
                    rc = proc.wait()
                finally:  # on a signal or an error, the ranks go down before the lease is released
                    _terminate(proc)
            if rc == 0:
                rundir.write_state(
                    run_dir, state="done", ended=time.time(), step=plan["config"]["num_iterations"]
                )
                return run_dir
            _raise_failure(run_dir, rc, tail)
    except Stopped as e:
        rundir.write_state(run_dir, state="stopped", ended=time.time(), error=f"stopped by {e}")
        raise RunFailed(
            f"run {plan['run']!r} stopped by {e}; resume with `armlab train ... --resume`"
        ) from None
    except BaseException as e:
        if rundir.read_state(run_dir).get("state") not in ("failed", "stopped"):
            rundir.write_state(
                run_dir,
                state="failed",
                ended=time.time(),
                error=str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
        raise
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return run_dir


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


def _error_line(lines: Iterable[bytes]) -> str | None:
    """The last line of the ranks' output that names an error: torchrun's own failures (a rendezvous
    that could not bind, a rank killed by a signal) leave no rank error file."""
    found = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if any(k in line for k in ("Error", "error:", "Exception", "received by PID")):
            found = line
    return found[:300] if found else None


def _raise_failure(run_dir: Path, rc: int, tail: Iterable[bytes] = ()) -> None:
    errors = rundir.read_rank_errors(run_dir)
    if errors:
        first = errors[0]
        rank, msg = first["rank"], first["error"]
        rundir.write_state(run_dir, state="failed", ended=time.time(), error=f"rank {rank}: {msg}")
        if first["kind"] == "bad_input":
            raise ArmlabError(msg)
        raise RunFailed(f"rank {rank} failed: {msg} (traceback in {run_dir / rundir.LOG})")
    detail = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    rundir.write_state(
        run_dir, state="failed", ended=time.time(), error=f"training processes failed ({detail})"
    )
    cause = _error_line(tail)
    raise RunFailed(
        f"training processes failed ({detail}){': ' + cause if cause else ''}; see {run_dir / rundir.LOG}"
    )


def train(
    exp: Experiment,
    arm: str,
    seed: int | None = None,
    run_name: str | None = None,
    num_gpus: int | None = None,
    device: str | None = None,
    nproc: int | None = None,
    master_port: int | None = None,
    resume: bool = False,
    detach: bool = False,
    force: bool = False,
    **overrides: Any,
) -> Path:
    """Train one arm (one seed); returns the run dir. See the module docstring."""
    plan = plan_run(
        exp, arm, seed, run_name, num_gpus, device, nproc, master_port, resume, force, **overrides
    )
    run_dir = Path(plan["run_dir"])
    if plan["resume_step"] == plan["config"]["num_iterations"]:  # killed after its final checkpoint
        console.print(f"train: {run_dir.name} already has its final checkpoint; nothing to resume")
        rundir.write_state(run_dir, state="done", error=None, step=plan["resume_step"])
        return run_dir
    if not detach:
        return run_plan(plan, echo=True)
    rundir.write_state(run_dir, state="starting", pid=None, started=time.time(), ended=None, error=None)
    with open(run_dir / rundir.LOG, "ab") as log:  # the detached launcher writes its own pid on start
        subprocess.Popen(
            [sys.executable, "-m", "armlab.train.launch", str(run_dir / rundir.PLAN)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return run_dir


def _main(plan_path: str) -> int:
    """Detached launcher: `python -m armlab.train.launch <run dir>/launch.json`."""
    try:
        run_plan(read_json(plan_path), echo=False)
    except (ArmlabError, RunFailed) as e:
        print(
            f"armlab: {'error' if isinstance(e, ArmlabError) else 'failed'}: {e}", file=sys.stderr, flush=True
        )
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
