"""A finished run's final values, from its own final records, and the refusal of torn metrics.

`metrics.jsonl` is a log: appended line by line while the run lives, so a disk that filled up or
a copy cut short leaves it torn or short, and its last readable val bpb is then not the final one
(issue 12: a report's verdict silently went from +0.0009 to +0.2774). So a run's final values come
from the records written once at the end: `state.json` (state done, the step reached) and
`eval.json` (the final evaluation); `run.json` gives the planned steps and the batch. The log is
cross-checked against them and a run whose log is torn (a line that is not JSON) or shorter than
its recorded steps is refused, one line naming the run and the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.errors import ArmlabError
from armlab.runs import EVAL_JSON, METRICS_JSONL, STATE_JSON, RunRecord


@dataclass(frozen=True)
class FinalValues:
    """What a finished run reached, as its final records say."""

    step: int
    tokens: int | None
    val_bpb: float | None
    core: float | None
    epoch: float | None
    train_time_s: float | None


def final_values(rec: RunRecord) -> FinalValues:
    """The run's final values; ArmlabError when its records disagree or its log is torn/short."""
    path = rec.dir / METRICS_JSONL
    fix = f"restore {path} from the host that trained it, or leave the run out with --exclude {rec.run}"
    state = rec.state or {}
    config = rec.info.get("config") or {}
    step = state.get("step")
    planned = config.get("num_iterations") or state.get("num_iterations")
    if not isinstance(step, int) or (planned and step != planned):
        raise ArmlabError(
            f"{rec.dir / STATE_JSON}: run {rec.run} is done but its step is {step!r}, not the "
            f"planned {planned}; retrain it (`armlab run` resumes it) or --exclude {rec.run}"
        )
    if not path.is_file():
        raise ArmlabError(f"{path}: run {rec.run} has no metrics log; {fix}")
    if rec.torn_metrics:  # runs.read_metrics keeps the numbers of the lines that are no record
        raise ArmlabError(
            f"{path}: run {rec.run} has a torn metrics log (line {rec.torn_metrics[0]} is not a whole "
            f"JSON record); {fix}"
        )
    steps = [m["step"] for m in rec.train_lines]
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ArmlabError(f"{path}: run {rec.run}'s training steps are out of order; {fix}")
    last = steps[-1] if steps else 0
    if last < step:
        raise ArmlabError(
            f"{path}: run {rec.run}'s metrics log stops at step {last} but state.json records {step} steps; {fix}"
        )
    ev = rec.eval or {}
    if ev.get("step") not in (None, step):
        raise ArmlabError(
            f"{rec.dir / EVAL_JSON}: run {rec.run} was evaluated at step {ev['step']}, not its final "
            f"step {step}; rerun `armlab evaluate EXP --force`"
        )
    val = ev.get("val_bpb")
    if val is None:  # never the log's in-training number: another measurement (report.evalcheck)
        raise ArmlabError(f"{rec.dir / EVAL_JSON}: run {rec.run} has no final val bpb; run `armlab evaluate EXP`")
    batch = config.get("total_batch_size")
    tokens = (
        step * batch if batch else next((m["tokens"] for m in reversed(rec.metrics) if "tokens" in m), None)
    )
    return FinalValues(
        step=step,
        tokens=tokens,
        val_bpb=float(val),
        core=rec.core,
        epoch=rec.epoch,
        train_time_s=rec.train_time_s,
    )
