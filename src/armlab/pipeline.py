"""`armlab run` and `armlab evaluate`: the whole experiment, locally, skipping what is complete.

    prepare (every arm, eval set, tokenizer sample) -> tokenizer -> train every arm x seed
    -> evaluate every finished run (val bpb + CORE) -> compare (report)

Each step is idempotent, so a rerun after a crash continues where it stopped: prepare and the
tokenizer skip complete outputs themselves; a run whose state.json says done is skipped, any
other existing run is resumed from its last checkpoint (`train(..., resume=True)`); a run whose
eval.json matches its checkpoint and bundle is not evaluated again. A failed run does not stop
the others; the failures are reported together at the end (exit 1).
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError, RunFailed
from armlab.progress import console
from armlab.report.runs import load_run
from armlab.spec import Experiment, fingerprint_diff
from armlab.workdir import atomic_write_json, open_workdir, pid_alive, run_name


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _select(exp: Experiment, arms: list[str] | None, seeds: list[int] | None) -> tuple[list[str], list[int]]:
    names = [exp.arm(a).name for a in arms] if arms else [a.name for a in exp.arms]
    return names, list(seeds) if seeds else list(exp.train.seeds)


def _live_elsewhere(run_dir: Path) -> int | None:
    """The pid of a live process on this host that owns the run, if any."""
    with contextlib.suppress(FileNotFoundError, ArmlabError):
        st = load_run(run_dir).state or {}
        if (
            st.get("state") in ("starting", "running")
            and st.get("pid")
            and st.get("host") == socket.gethostname()
        ):
            return int(st["pid"]) if pid_alive(int(st["pid"])) else None
    return None


def train_runs(
    exp: Experiment, arms: list[str], seeds: list[int], device: str | None = None, num_gpus: int | None = None
) -> tuple[list[Path], list[str]]:
    """Train every arm x seed not yet done; returns (finished run dirs, failure messages)."""
    from armlab.train.launch import train

    wd = open_workdir(exp, create=False)
    want = json.loads(json.dumps(exp.comparability(), default=str))
    done, failures = [], []
    for arm in arms:
        for seed in seeds:
            run_dir = wd.run_dir(arm, run_name(arm, seed))
            rec = load_run(run_dir) if (run_dir / "run.json").is_file() else None
            state = (rec.state or {}).get("state") if rec else None
            changed = fingerprint_diff(want, rec.info.get("comparability") or {}) if rec else []
            if changed:
                failures.append(
                    f"{run_dir.name}: trained with a different spec (differs in {', '.join(changed)}); "
                    f"move {run_dir} away to retrain it, or use another workdir"
                )
                continue
            if state == "done":
                console.print(f"run: {run_dir.name} already done")
                done.append(run_dir)
                continue
            pid = _live_elsewhere(run_dir)
            if pid is not None:
                failures.append(
                    f"{run_dir.name}: still running (pid {pid}); wait for it, see `armlab status`"
                )
                continue
            resume = (run_dir / "run.json").is_file()
            console.print(f"run: {'resuming' if resume else 'training'} {run_dir.name}")
            try:
                done.append(train(exp, arm, seed=seed, device=device, num_gpus=num_gpus, resume=resume))
            except RunFailed as e:
                if (load_run(run_dir).state or {}).get("state") == "stopped":
                    raise  # stopped by a signal (Ctrl-C, kill): stop everything, do not start the next run
                failures.append(f"{run_dir.name}: {e}")
    return done, failures


def evaluate_run(
    exp: Experiment,
    run_dir: Path,
    bundle: Any = None,
    max_per_task: int | None = None,
    device: str | None = None,
    force: bool = False,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Final val bpb on the shared eval set (all of it, or its first max_tokens tokens) and CORE
    (when a bundle is given) -> <run>/eval.json."""
    from armlab.evaluate.bpb import evaluate_bpb
    from armlab.evaluate.core import evaluate_core
    from armlab.tokenizer import load_experiment_tokenizer
    from armlab.train.checkpoint import load_model, read_meta

    rec = load_run(run_dir)
    if rec.info.get("experiment") != exp.name:
        raise ArmlabError(
            f"{run_dir}: run belongs to experiment {rec.info.get('experiment')!r}, not {exp.name!r}"
        )
    if rec.state_name != "done":
        raise ArmlabError(
            f"{run_dir}: run is {rec.state_name}, not done; finish it first (`armlab run` resumes it)"
        )
    step = read_meta(run_dir)["step"]
    want = {  # an eval.json is reused only for this exact checkpoint, bundle and budget
        "step": step,
        "run_ended": (rec.state or {}).get("ended"),  # a retrained run has new weights at the same step
        "bundle_sha256": bundle.sha256 if bundle else None,
        "max_per_task": max_per_task,
        "max_tokens": max_tokens,  # None: the whole eval set
    }
    if rec.eval and not force and all(rec.eval.get(k) == v for k, v in want.items()):
        return rec.eval
    device = device or default_device()
    tok = load_experiment_tokenizer(exp)
    if tok.fingerprint != rec.info.get("tokenizer_fingerprint"):
        raise ArmlabError(
            f"{run_dir}: trained with tokenizer {rec.info.get('tokenizer_fingerprint')}, "
            f"but the experiment's is now {tok.fingerprint}; it cannot be evaluated comparably"
        )
    model, _ = load_model(run_dir, device=device)  # bf16 on CUDA like training, no autocast
    wd = open_workdir(exp, create=False)
    bpb = evaluate_bpb(
        model,
        tok,
        wd.eval_dir,
        max_tokens=max_tokens,
        batch_size=exp.train.device_batch_size,
        seq_len=exp.model.max_seq_len,
        device=device,
    )
    core = (
        evaluate_core(
            model, tok, bundle, device=device, max_per_task=max_per_task, max_len=exp.model.max_seq_len
        )
        if bundle
        else {"core": None, "core_tasks": {}, "bundle": None}
    )
    result = {**want, **bpb.eval_json(), **core}
    atomic_write_json(run_dir / "eval.json", result)
    core_txt = "" if core["core"] is None else f", CORE {core['core']:.4f}"
    console.print(
        f"evaluate: {rec.run}: val bpb {bpb.bpb:.4f} ({bpb.tokens:,} tokens of {bpb.docs:,} eval docs){core_txt}"
    )
    return result


def open_bundle(exp: Experiment, source: str | None = None) -> Any:
    """The experiment's CORE bundle (--bundle overrides evaluate.core_bundle); None when neither is set."""
    from armlab.evaluate.bundle import load_bundle

    source = source or exp.evaluate.core_bundle
    if not source:
        console.print("evaluate: no CORE bundle (set evaluate.core_bundle or pass --bundle); val bpb only")
        return None
    return load_bundle(
        source, sha256=exp.evaluate.core_bundle_sha256 if source == exp.evaluate.core_bundle else None
    )


def evaluate_experiment(
    exp: Experiment,
    arms: list[str] | None = None,
    bundle: str | None = None,
    max_per_task: int | None = None,
    device: str | None = None,
    force: bool = False,
    max_tokens: int | None = None,
) -> list[Path]:
    """Evaluate every finished run of the selected arms; returns their run dirs."""
    names, _ = _select(exp, arms, None)
    wd = open_workdir(exp, create=False)
    runs = [r.dir for r in map(load_run, wd.all_run_dirs()) if r.arm in names and r.state_name == "done"]
    if not runs:
        raise ArmlabError(
            f"experiment {exp.name!r} has no finished runs{' of ' + ', '.join(arms) if arms else ''} to "
            "evaluate; `armlab status EXP` shows where they are"
        )
    opened = open_bundle(exp, bundle)
    per_task = max_per_task or exp.evaluate.max_per_task
    for d in runs:
        evaluate_run(exp, d, opened, per_task, device, force, max_tokens)
    return runs


def run_experiment(
    exp: Experiment,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
    device: str | None = None,
    num_gpus: int | None = None,
    bundle: str | None = None,
    max_per_task: int | None = None,
) -> Path:
    """Everything, locally; returns the report dir. Raises RunFailed after the others if a run failed."""
    from armlab.data.prepare import prepare
    from armlab.report.compare import compare
    from armlab.tokenizer import train_experiment_tokenizer

    names, seed_list = _select(exp, arms, seeds)
    open_workdir(exp)
    prepare(exp, arms=names)
    train_experiment_tokenizer(exp)
    done, failures = train_runs(exp, names, seed_list, device=device, num_gpus=num_gpus)
    if done:
        opened = open_bundle(exp, bundle)
        for d in done:
            evaluate_run(exp, d, opened, max_per_task or exp.evaluate.max_per_task, device)
        out, _ = compare(exp)
        console.print(f"report: {out / 'report.md'} (and report.html, summary.json)")
    if failures:
        raise RunFailed(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    return open_workdir(exp, create=False).report_dir
