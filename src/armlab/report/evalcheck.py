"""Which runs' final evaluations compare may use: each tied to its run, all of one kind.

Issue 20 found compare trusting eval.json files it could not tie to their run: one copied from
another run was accepted ("+0.0000 within noise"), and a run whose eval.json was missing was
silently compared by its 4,096-token in-training val bpb against the others' whole-eval-set
numbers (+0.0554 reported, truth -0.0001). So, before any number is read:

- a finished run without a final evaluation (no eval.json, or one written by an armlab before
  eval records named their checkpoint) is **left out and named**, never replaced by a training-time
  number (`armlab evaluate EXP` evaluates it);
- an eval.json that does not belong to its run is **refused**, naming the file: another run's name,
  another step than the run's final one, another end of the run (retrained since), a checkpoint
  whose weights hash differently from the run's checkpoint at that step now, or another eval set
  than the experiment's (a run dir copied without its checkpoints is said, not refused);
- runs whose evaluations measured different things (whole documents vs an older packed stream, a
  sample vs every document) are refused by `compare.check_eval_coverage`.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.errors import ArmlabError
from armlab.evaluate.checkpoints import weights_sha256
from armlab.evaluate.docs import eval_set_fingerprint
from armlab.evaluate.record import EvalResult
from armlab.runs import EVAL_JSON, RunRecord
from armlab.spec import Experiment
from armlab.workdir import open_workdir

FIX = "rerun `armlab evaluate EXP --force`"


@dataclass(frozen=True)
class LeftOut:
    run: RunRecord
    reason: str


def check_evals(exp: Experiment, runs: list[RunRecord]) -> tuple[list[RunRecord], list[LeftOut], list[str]]:
    """(runs whose eval.json is theirs, runs left out for want of a final evaluation, notes on
    what could not be checked); refuses (ArmlabError naming the file) an eval.json that belongs to
    another run, checkpoint or eval set."""
    from armlab.train.engines import get_engine

    eval_fp = eval_set_fingerprint(open_workdir(exp, create=False).eval_dir)
    ok, left, notes = [], [], []
    for r in runs:
        path = r.dir / EVAL_JSON
        if r.eval is None:
            left.append(
                LeftOut(r, f"{r.run}: no final evaluation ({path} missing); `armlab evaluate EXP` scores it")
            )
            continue
        ev = EvalResult.from_json(r.eval, r.run)
        if ev.checkpoint is None or ev.eval_set is None or ev.bpb is None:
            left.append(
                LeftOut(r, f"{r.run}: {path} is from an older armlab (it names no checkpoint); {FIX}")
            )
            continue
        if ev.run != r.run:
            raise ArmlabError(f"{path}: an evaluation of run {ev.run!r}, not of {r.run!r} (copied?); {FIX}")
        step = (r.state or {}).get("step")
        if ev.checkpoint.step != step:
            raise ArmlabError(
                f"{path}: evaluated the checkpoint of step {ev.checkpoint.step}, but run {r.run} ended at step "
                f"{step}; {FIX}"
            )
        ended = (r.state or {}).get("ended")
        if ev.run_ended is not None and ended is not None and ev.run_ended != ended:
            raise ArmlabError(f"{path}: evaluated run {r.run} as it ended at {ev.run_ended}, but it ended again at "
                              f"{ended} (retrained since); {FIX}")  # fmt: skip
        files = get_engine(r.engine).weights_files(r.dir, ev.checkpoint.step)
        missing = [f for f in files if not f.is_file()]
        if missing:  # a run dir copied without its checkpoints: the rest still ties it to its run
            notes.append(
                f"{r.run}: its checkpoint weights are not here ({missing[0].name}), so eval.json's checkpoint hash "
                "could not be checked (run dir copied without checkpoints?)"
            )
        elif weights_sha256(files) != ev.checkpoint.sha256:
            raise ArmlabError(
                f"{path}: evaluated other weights than run {r.run}'s checkpoint at step {step} holds (sha256 "
                f"{ev.checkpoint.sha256[:12]} vs {weights_sha256(files)[:12]}): an eval.json of another run, or a "
                f"checkpoint replaced since; {FIX}"
            )
        if ev.eval_set.fingerprint != eval_fp:
            raise ArmlabError(
                f"{path}: scored eval set {ev.eval_set.fingerprint}, but the experiment's is now {eval_fp} "
                f"(prepared again?); {FIX}"
            )
        ok.append(r)
    return ok, left, notes
