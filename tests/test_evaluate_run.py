"""`armlab evaluate` of a real (tiny, built-in) run: eval.json names what it scored, the last k
checkpoints measure noise, a matching eval.json is reused, and average_last_k averages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from armlab.evaluate.bundle import load_bundle, write_bundle
from armlab.evaluate.checkpoints import weights_sha256
from armlab.evaluate.docs import eval_set_fingerprint
from armlab.evaluate.record import EvalResult
from armlab.evaluate.run import evaluate_run
from armlab.runs import write_state
from armlab.spec import with_overrides
from armlab.train.loop import Dist, train_loop
from armlab.train.plan import TrainOptions, plan_run
from armlab.workdir import open_workdir
from train_util import ARM, build_workdir, experiment

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """One 12-step run (checkpoints at 8 and at the last 3: 10, 11, 12) and a 2-task bundle."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("evalrun")
    exp_file = build_workdir(root)
    exp = with_overrides(experiment(exp_file), {"num_iterations": 12, "evaluate.last_k_every": 1})
    plan = plan_run(exp, ARM, TrainOptions(run_name="r", device="cpu", overrides={"num_iterations": 12}))
    train_loop(plan, Dist(0, 1, torch.device("cpu")))
    write_state(plan.run_dir, state="done", step=12, num_iterations=12, ended=1.0, phase=None)  # as the supervisor does
    items = [{"query": f"Which is a colour, {i}?", "choices": ["red", "table", "run"], "gold": 0} for i in range(8)]
    lm = [{"context": f"one two three {i}", "continuation": " four"} for i in range(8)]
    bundle = load_bundle(
        write_bundle(root / "bundle", [
            {"label": "mc", "icl_task_type": "multiple_choice", "num_fewshot": 0, "random_baseline": 100 / 3,
             "items": items},
            {"label": "lm", "icl_task_type": "language_modeling", "num_fewshot": 0, "random_baseline": 0,
             "items": lm},
        ])  # fmt: skip
    )
    return plan.run_dir, bundle, exp


def test_eval_json_names_what_it_scored_and_is_reused(trained) -> None:
    run_dir, bundle, exp = trained
    result, reused = evaluate_run(exp, run_dir, bundle)
    assert not reused
    wd = open_workdir(exp, create=False)
    on_disk = EvalResult.from_json(json.loads((run_dir / "eval.json").read_text()))
    assert on_disk == result  # the typed record round-trips through eval.json
    assert result.checkpoint.step == 12
    assert result.checkpoint.sha256 == weights_sha256([run_dir / "checkpoints" / "step_000012" / "model.pt"])
    assert result.eval_set.fingerprint == eval_set_fingerprint(wd.eval_dir)
    assert result.bpb.method.kind == "whole_docs" and result.bpb.coverage == 1.0
    assert result.packed.method.kind == "packed" and result.packed.coverage < 1.0
    # the last 3 checkpoints: CORE on each (their noise); val bpb on the final only (not averaged)
    assert [c.checkpoint.step for c in result.checkpoints] == [10, 11, 12]
    assert [c.val_bpb is None for c in result.checkpoints] == [True, True, False]
    assert all(set(c.tasks) == {"mc", "lm"} for c in result.checkpoints)
    assert result.checkpoints[-1].core == pytest.approx(result.core.core)
    mc = result.core.tasks["mc"]
    assert len(mc.logprob) == len(mc.margin) == len(mc.bytes) == 8 and all(b > 0 for b in mc.bytes)
    assert result.core.tasks["lm"].margin is None
    again, reused = evaluate_run(exp, run_dir, bundle)
    assert reused and again == result
    # another budget is another measurement: evaluated again, not reused
    sample, reused = evaluate_run(exp, run_dir, bundle, max_tokens=500)
    assert not reused and sample.max_tokens == 500 and sample.bpb.coverage < 1.0


def test_average_last_k_averages_every_figure(trained) -> None:
    run_dir, bundle, exp = trained
    avg_exp = with_overrides(exp, {"evaluate.average_last_k": True})
    result, _ = evaluate_run(avg_exp, run_dir, bundle)
    assert result.averaged == 3 and all(c.val_bpb is not None for c in result.checkpoints)
    assert result.bpb.bpb == pytest.approx(sum(c.val_bpb for c in result.checkpoints) / 3, rel=1e-12)
    per_doc = sum(result.bpb.per_doc_nats) / (math.log(2) * sum(result.bpb.per_doc_bytes))
    assert per_doc == pytest.approx(result.bpb.bpb, rel=1e-9)  # the per-document sums are the means too
    assert result.core.core == pytest.approx(sum(c.core for c in result.checkpoints) / 3, rel=1e-9)
    mc = result.core.tasks["mc"]
    assert mc.accuracy == pytest.approx(sum(mc.correct) / len(mc.correct))  # correct: share of checkpoints


def test_status_shows_the_evaluation_while_it_runs_and_nothing_after(trained, monkeypatch) -> None:
    """`armlab evaluate` on a done run writes phase "eval" and which checkpoint into state.json, so
    status shows `done+eval:2/3` (0.2: a bare `done` for minutes), and clears both when it ends:
    normally and on Ctrl-C mid-way. The run stays done with its end time (compare checks it). The
    engine's scoring is wrapped to look at state.json and status while each checkpoint is scored."""
    from dataclasses import replace

    from armlab.ops.status import plain_table, run_status
    from armlab.runs import read_run_state
    from armlab.train.engines.builtin import BuiltinEngine

    run_dir, bundle, exp = trained
    before = read_run_state(run_dir)
    seen, stop_at = [], None
    real = BuiltinEngine.evaluate

    def watched(self, request):
        st, row = read_run_state(run_dir), run_status(run_dir, stall_after_s=600)
        seen.append((st.state, st.phase, st.evaluating.index, st.evaluating.of, st.evaluating.step, row.state))
        assert f" done+eval:{st.evaluating.index}/3 " in plain_table([row]).splitlines()[1]
        if st.evaluating.index == stop_at:
            raise KeyboardInterrupt
        return real(self, request)

    monkeypatch.setattr(BuiltinEngine, "evaluate", watched)
    evaluate_run(exp, run_dir, bundle, force=True, max_tokens=500)
    assert seen == [("done", "eval", i, 3, step, "done") for i, step in ((1, 10), (2, 11), (3, 12))]
    after = read_run_state(run_dir)
    assert after.phase is None and after.evaluating is None and replace(after, updated=None) == replace(before, updated=None)
    assert run_status(run_dir, stall_after_s=600).evaluating is None
    seen.clear()
    stop_at = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(exp, run_dir, bundle, force=True, max_tokens=500)
    assert [s[2] for s in seen] == [1, 2]
    after = read_run_state(run_dir)
    assert after.phase is None and after.evaluating is None and replace(after, updated=None) == replace(before, updated=None)
