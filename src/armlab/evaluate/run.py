"""`armlab evaluate` for one finished run: its last k checkpoints, scored by armlab, into eval.json.

Every engine's checkpoints are scored by the same code on the engine's own model class
(`Engine.load_model`): whole-document val bpb over every byte of the eval set (armlab.evaluate.bpb),
nanochat's packed val bpb as a second, labelled number (final checkpoint only), and CORE with
per-item continuous scores (armlab.evaluate.core). So item-level scores, and intervals over them,
exist for both engines.

The last k checkpoints (`[evaluate] last_k`) are scored to measure the run's own noise (CORE only,
unless they are averaged: val bpb is the costly part, and the final one is scored whole): Signal and
Noise (Heineman et al. 2025) define a benchmark's noise as the standard deviation of its score over
the final checkpoints of one run, and its signal as the spread of scores between models (here
arms); report.snr turns the per-checkpoint scores in eval.json into per-task signal-to-noise. With
`[evaluate] average_last_k` the headline figures are the mean over those k evaluations (their
"checkpoint averaging" intervention); else the final checkpoint's.

While it scores, the run's state.json says so (phase "eval" and `runs.Evaluating`: checkpoint i of
k, by this process), and `armlab status` shows the done run as `done+eval:2/3`; both are cleared
when it ends, also on an error or Ctrl-C (a SIGKILL leaves them, and status tells by the pid).

The result is an `EvalResult` (armlab.evaluate.record) naming the checkpoint it scored (step and
sha256 of its weights), the eval set (content fingerprint) and the method, which `compare` checks.
An existing eval.json is reused only when all of those, the bundle and the budget still match.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.evaluate.checkpoints import weights_sha256
from armlab.evaluate.docs import eval_set_fingerprint
from armlab.evaluate.record import (
    WHOLE_DOCS,
    BpbResult,
    CheckpointEval,
    CheckpointRef,
    CheckpointScores,
    CoreResult,
    EvalResult,
    EvalSetRef,
    TaskResult,
)
from armlab.progress import console
from armlab.runs import EVAL_JSON, Evaluating, Phase, RunState, load_run, read_run_state, write_state
from armlab.spec import Experiment
from armlab.workdir import atomic_write_json, open_workdir


# -- averaging over the last k checkpoints -------------------------------------------------------------
def _mean_lists(lists: list[list[float] | None]) -> list[float] | None:
    if any(x is None for x in lists):
        return None
    return [sum(v) / len(v) for v in zip(*lists, strict=True)]  # type: ignore[arg-type]


def average_bpb(results: list[BpbResult]) -> BpbResult:
    """The mean over checkpoints: per-document nats averaged (the bytes are the same documents')."""
    first = results[0]
    if len(results) == 1:
        return first
    nats = _mean_lists([r.per_doc_nats for r in results])
    bpb = sum(r.bpb for r in results) / len(results)  # = sum(mean nats) / (ln 2 * bytes)
    return dataclasses.replace(first, bpb=bpb, per_doc_nats=nats)


def average_core(results: list[CoreResult]) -> CoreResult:
    """The mean over checkpoints of every task's accuracy and per-item scores (correct becomes the
    share of checkpoints that got the item right)."""
    first = results[0]
    if len(results) == 1:
        return first
    tasks: dict[str, TaskResult] = {}
    for label, t in first.tasks.items():
        ts = [r.tasks[label] for r in results]
        acc = sum(x.accuracy for x in ts) / len(ts)
        tasks[label] = dataclasses.replace(
            t, accuracy=acc, centered=sum(x.centered for x in ts) / len(ts),
            correct=_mean_lists([x.correct for x in ts]), logprob=_mean_lists([x.logprob for x in ts]),
            margin=_mean_lists([x.margin for x in ts]),
        )  # fmt: skip
    return dataclasses.replace(first, tasks=tasks)


# -- what status sees -----------------------------------------------------------------------------------
def mark_evaluating(run_dir: Path, index: int, of: int, step: int) -> None:
    """state.json: this process scores checkpoint `index` of `of` (the run stays done)."""
    progress = Evaluating(index, of, step, os.getpid(), socket.gethostname())
    write_state(run_dir, phase=Phase.EVAL, evaluating=progress)


def clear_evaluating(run_dir: Path) -> None:
    """state.json without this process's evaluate phase (another evaluator's is left alone)."""
    st = read_run_state(run_dir)
    if st is not None and st.evaluating is not None and st.evaluating.pid == os.getpid():
        write_state(run_dir, phase=None, evaluating=None)


# -- one run ------------------------------------------------------------------------------------------
def checkpoint_ref(engine: Any, run_dir: Path, step: int, remember: bool = False) -> CheckpointRef:
    """The checkpoint at `step` by content (its weight files' sha256)."""
    files = engine.weights_files(run_dir, step)
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ArmlabError(f"{missing[0]}: checkpoint weights missing; retrain the run (`armlab run` does)")
    return CheckpointRef(step, weights_sha256(files, remember))


def _reusable(old: EvalResult, want: dict[str, Any]) -> bool:
    return (
        old.version == want["version"]
        and old.checkpoint == want["checkpoint"]
        and [c.checkpoint for c in old.checkpoints] == want["refs"]
        and old.run_ended == want["run_ended"]
        and old.eval_set is not None
        and old.eval_set.fingerprint == want["eval_set"]
        and old.method == WHOLE_DOCS
        and old.max_tokens == want["max_tokens"]
        and (old.core.bundle.get("sha256") if old.core else None) == want["bundle"]
        and (old.core.max_per_task if old.core else want["max_per_task"]) == want["max_per_task"]
        and old.averaged == want["averaged"]
    )


def evaluate_run(
    exp: Experiment,
    run_dir: Path,
    bundle: Any = None,
    max_per_task: int | None = None,
    device: str = "cpu",
    force: bool = False,
    max_tokens: int | None = None,
) -> tuple[EvalResult, bool]:
    """Evaluate a finished run's last k checkpoints -> <run>/eval.json; returns (result, reused)."""
    from armlab.tokenizer import load_experiment_tokenizer
    from armlab.train.engines import EvalRequest, get_engine

    rec = load_run(run_dir)
    if rec.info.get("experiment") != exp.name:
        raise ArmlabError(
            f"{run_dir}: run belongs to experiment {rec.info.get('experiment')!r}, not {exp.name!r}"
        )
    if rec.state_name != RunState.DONE:
        raise ArmlabError(
            f"{run_dir}: run is {rec.state_name}, not done; finish it first (`armlab run` resumes it)"
        )
    engine = get_engine(rec.engine)
    steps = engine.checkpoint_steps(run_dir)
    if not steps:
        raise ArmlabError(
            f"{run_dir}: no complete checkpoint to evaluate; retrain the run (`armlab run` does)"
        )
    # the last k: their CORE scores measure the noise; with average_last_k they all make the figures.
    # Without either (no bundle, no averaging) only the final checkpoint is scored.
    k = exp.evaluate.last_k if (bundle is not None or exp.evaluate.average_last_k) else 1
    chosen = steps[-k:]
    refs = [checkpoint_ref(engine, run_dir, s, remember=True) for s in chosen]
    wd = open_workdir(exp, create=False)
    averaged = len(chosen) if exp.evaluate.average_last_k else 1
    want = {
        "version": EvalResult.version, "checkpoint": refs[-1], "refs": refs,
        "run_ended": (rec.state or {}).get("ended"),
        "eval_set": eval_set_fingerprint(wd.eval_dir), "max_tokens": max_tokens,
        "bundle": bundle.sha256 if bundle else None, "max_per_task": max_per_task, "averaged": averaged,
    }  # fmt: skip
    if rec.eval and not force:
        old = EvalResult.from_json(rec.eval, rec.run)
        if _reusable(old, want):
            return old, True
    tok = load_experiment_tokenizer(exp)
    if tok.fingerprint != rec.info.get("tokenizer_fingerprint"):
        raise ArmlabError(
            f"{run_dir}: trained with tokenizer {rec.info.get('tokenizer_fingerprint')}, "
            f"but the experiment's is now {tok.fingerprint}; it cannot be evaluated comparably"
        )
    if len(chosen) < k:
        console.print(
            f"[yellow]evaluate: {rec.run} has {len(chosen)} checkpoint(s) of the {exp.evaluate.last_k} "
            f"evaluate.last_k asks for (steps {', '.join(map(str, chosen))}); scoring those[/]"
        )
    results: list[CheckpointEval] = []
    try:
        for i, step in enumerate(chosen, 1):
            final = step == chosen[-1]
            mark_evaluating(run_dir, i, len(chosen), step)
            # an earlier checkpoint whose scores only measure noise: CORE only (val bpb is the costly part)
            request = EvalRequest(run_dir, exp, tok, wd.eval_dir, bundle, max_per_task, device, max_tokens,
                                  step=step, packed=final, bpb=final or averaged > 1)  # fmt: skip
            if len(chosen) > 1:
                console.print(f"evaluate: {rec.run}: checkpoint {step} ({i}/{len(chosen)})")
            results.append(engine.evaluate(request))
    finally:
        clear_evaluating(run_dir)
    last = results[-1]
    use = results[-averaged:]
    bpb = average_bpb([r.bpb for r in use if r.bpb is not None])
    core = average_core([r.core for r in use]) if last.core is not None else None  # type: ignore[misc]
    if not math.isfinite(bpb.bpb):
        raise ArmlabError(
            f"{run_dir}: val bpb is {bpb.bpb} (the model's losses are not finite); retrain the run"
        )
    result = EvalResult(
        run=rec.run, checkpoint=refs[-1], run_ended=want["run_ended"],
        eval_set=EvalSetRef(want["eval_set"], len(bpb.per_doc_bytes or []), bpb.eval_bytes),
        bpb=bpb, packed=last.packed, core=core, max_tokens=max_tokens,
        checkpoints=[CheckpointScores.of(ref, r.bpb, r.core) for ref, r in zip(refs, results, strict=True)],
        averaged=averaged, engine=last.engine,
    )  # fmt: skip
    atomic_write_json(run_dir / EVAL_JSON, result.to_json())
    return result, False


def summary_line(result: EvalResult) -> str:
    """One line for the terminal: both val bpb numbers with what they cover, CORE and its companions."""
    b, p = result.bpb, result.packed
    assert b is not None
    parts = [f"val bpb {b.bpb:.4f} (whole docs: {b.docs:,} docs, {100 * b.coverage:.0f}% of the eval bytes)"]
    if p is not None:
        parts.append(f"packed {p.bpb:.4f} ({100 * p.coverage:.0f}% of the bytes)")
    if result.core is not None:
        c = result.core
        parts.append(f"CORE {c.core:.4f}")
        if c.core_lp is not None:
            parts.append(f"CORE log-prob {c.core_lp:.4f} bits/byte")
    if len(result.checkpoints) > 1:
        steps = ", ".join(str(c.checkpoint.step) for c in result.checkpoints)
        how = (
            f"mean of steps {steps}"
            if result.averaged > 1
            else f"last {len(result.checkpoints)}: steps {steps}"
        )
        parts.append(how)
    return ", ".join(parts)
