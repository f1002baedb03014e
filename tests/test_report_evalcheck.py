"""compare uses only final evaluations it can tie to their run (issue 20), on hand-made run dirs:
an eval.json copied from another run, or one of another checkpoint or eval set, is refused naming
the file; a run without its final evaluation is left out and named, never replaced by its
in-training val bpb."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.errors import ArmlabError
from armlab.evaluate.record import EvalResult
from armlab.report.compare import compare
from armlab.workdir import open_workdir
from results_util import make_run, tiny_experiment


def four_runs(tmp_path: Path):
    exp = tiny_experiment(tmp_path / "wd")
    dirs = {}
    for seed, (bt, br) in enumerate([(1.50, 1.60), (1.52, 1.61)]):
        dirs[f"top-s{seed}"] = make_run(exp, "top", seed, bpb=bt)
        dirs[f"random-s{seed}"] = make_run(exp, "random", seed, bpb=br)
    return exp, dirs


def test_an_eval_json_copied_from_another_run_is_refused(tmp_path: Path) -> None:
    exp, dirs = four_runs(tmp_path)
    shutil.copy(dirs["random-s0"] / "eval.json", dirs["top-s0"] / "eval.json")  # the fault of issue 20
    with pytest.raises(ArmlabError, match=r"top-s0/eval.json: an evaluation of run 'random-s0', not of 'top-s0'"):
        compare(exp)
    # renamed to pass the name check, the weights' hash still tells: it scored another checkpoint
    ev = json.loads((dirs["top-s0"] / "eval.json").read_text())
    ended = json.loads((dirs["top-s0"] / "state.json").read_text())["ended"]
    (dirs["top-s0"] / "eval.json").write_text(json.dumps({**ev, "run": "top-s0", "run_ended": ended}))
    with pytest.raises(ArmlabError, match=r"top-s0/eval.json: evaluated other weights than run top-s0's checkpoint"):
        compare(exp)


def test_a_replaced_checkpoint_or_another_eval_set_is_refused(tmp_path: Path) -> None:
    exp, dirs = four_runs(tmp_path)
    (dirs["random-s1"] / "checkpoints" / "step_000010" / "model.pt").write_bytes(b"retrained weights")
    with pytest.raises(ArmlabError, match=r"random-s1/eval.json: evaluated other weights"):
        compare(exp)
    exp, dirs = four_runs(tmp_path / "b")
    eval_dir = open_workdir(exp, create=False).eval_dir
    pq.write_table(pa.table({"text": ["another eval set"]}), eval_dir / "shard_00000.parquet")
    manifest = json.loads((eval_dir / "manifest.json").read_text())
    manifest["files"][0]["sha256"] = "f" * 64  # prepared again: new content
    (eval_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArmlabError, match=r"eval.json: scored eval set \w+, but the experiment's is now \w+"):
        compare(exp)


def test_a_run_without_its_final_eval_is_left_out_and_named_never_its_training_number(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    make_run(exp, "top", 0, bpb=1.50)
    make_run(exp, "random", 0, bpb=1.60)
    make_run(exp, "random", 1, bpb=1.61)
    # top-s1 trained but was never evaluated: its log's last val bpb (4,096-token style) is 1.30
    d = make_run(exp, "top", 1, bpb=1.30, evaluated=False)
    assert not (d / "eval.json").exists()
    _, s = compare(exp)
    top = s.arms["top"]
    assert [r.run for r in top.runs] == ["top-s0"]  # top-s1 is not in the numbers
    assert top.val_bpb.estimate == pytest.approx(1.50)
    assert any(w.startswith("left out: top-s1: no final evaluation") for w in s.warnings), s.warnings
    assert "top-s1" in [x.run for x in s.excluded]


def test_an_older_eval_json_is_left_out_with_the_fix(tmp_path: Path) -> None:
    exp, dirs = four_runs(tmp_path)
    old = {"step": 10, "val_bpb": 1.5, "val_bpb_tokens": 1000}  # armlab 0.2: no checkpoint, no eval set
    (dirs["top-s1"] / "eval.json").write_text(json.dumps(old))
    _, s = compare(exp)
    assert [r.run for r in s.arms["top"].runs] == ["top-s0"]
    assert any("top-s1" in w and "older armlab" in w and "--force" in w for w in s.warnings)
    assert EvalResult.from_json(old, "top-s1").val_bpb == 1.5  # still readable, named, not used


def test_a_run_copied_without_checkpoints_is_said_and_a_retrained_one_refused(tmp_path: Path) -> None:
    exp, dirs = four_runs(tmp_path)
    shutil.rmtree(dirs["top-s1"] / "checkpoints")  # copied from the GPU host without its checkpoints
    _, s = compare(exp)
    assert [r.run for r in s.arms["top"].runs] == ["top-s0", "top-s1"]
    assert any("top-s1: its checkpoint weights are not here" in w for w in s.warnings), s.warnings
    state = json.loads((dirs["top-s1"] / "state.json").read_text())
    (dirs["top-s1"] / "state.json").write_text(json.dumps({**state, "ended": state["ended"] + 60}))
    with pytest.raises(ArmlabError, match=r"top-s1/eval.json: evaluated run top-s1 as it ended at .* \(retrained since\)"):
        compare(exp)
