"""The ladder report: each depth compared on its own, the ranking at each depth, whether it holds
up to the target depth or flips, and what a run costs at each depth."""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.report.compare import compare
from armlab.spec import parse_experiment
from results_util import make_run


def ladder_experiment(workdir: Path, depths=(1, 2, 3), depth: int = 3):
    return parse_experiment({
        "name": "lad", "workdir": str(workdir), "pool": {"uri": str(workdir / "pool")},
        "arms": [{"name": "top", "kind": "top", "ratio": 0.5, "score_column": "score"},
                 {"name": "random", "kind": "random", "ratio": 0.5}],
        "tokenizer": {"vocab_size": 512},
        "model": {"depth": depth, "max_seq_len": 64, "aspect_ratio": 32, "head_dim": 32},
        "train": {"target_param_data_ratio": 2, "total_batch_size": 1024, "device_batch_size": 4, "seeds": [0, 1, 2]},
        "ladder": {"depths": list(depths)},
    })  # fmt: skip


def rung_runs(exp, depth: int, diff: float) -> None:
    rung = exp.at_depth(depth)
    for s in (0, 1, 2):
        base = 2.0 - 0.1 * depth + 0.003 * s
        make_run(rung, "random", s, bpb=base)
        make_run(rung, "top", s, bpb=base + diff + 0.002 * (s % 2))


def test_the_ladder_shows_the_ranking_per_depth_and_where_it_starts_to_hold(tmp_path: Path) -> None:
    exp = ladder_experiment(tmp_path / "wd")
    assert exp.run_name("top", 0) == "top-d3-s0" and exp.at_depth(1).run_name("top", 0) == "top-d1-s0"
    rung_runs(exp, 1, -0.03)
    rung_runs(exp, 2, +0.0005)  # within noise at d2
    rung_runs(exp, 3, -0.02)
    out, s = compare(exp)
    # the experiment's own verdict is about the target depth only; the other rungs' runs are not refused
    assert s.verdict[0].startswith("top beats random on val bpb by -0.019")
    assert {r.run for r in s.arms["top"].runs} == {"top-d3-s0", "top-d3-s1", "top-d3-s2"}
    lad = s.ladder
    assert lad.target == 3 and [r.depth for r in lad.rungs] == [1, 2, 3]
    assert lad.rungs[0].params < lad.rungs[1].params < lad.rungs[2].params
    assert lad.rungs[0].tokens == pytest.approx(2 * lad.rungs[0].params, rel=0.02)  # ratio x its own params
    (line,) = lad.verdict
    assert line.startswith("top vs random, val bpb by depth: d1 better (-0.029")
    assert "d2 within noise" in line and "d3 better (-0.019" in line and "(target)" in line
    assert "the ranking holds; the smallest depth that already decides as the target does is d1" in line
    md = (out / "report.md").read_text()
    assert "## Ladder: the ranking at each depth" in md and "| d3 (target) |" in md
    assert (out / "ladder.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_ranking_that_flips_between_depths_is_said_and_a_missing_depth_is_named(tmp_path: Path) -> None:
    exp = ladder_experiment(tmp_path / "wd")
    rung_runs(exp, 1, +0.03)  # top worse at d1 ...
    rung_runs(exp, 3, -0.02)  # ... better at the target
    _, s = compare(exp)
    (line,) = s.ladder.verdict
    assert "d1 worse" in line and "the ranking FLIPS between depths (d1, d3 disagree)" in line
    (d2,) = [r for r in s.ladder.rungs if r.depth == 2]
    assert d2.missing and "no finished runs" in d2.missing and not d2.differences


def test_a_ladder_needs_the_target_depth_and_a_ratio_horizon(tmp_path: Path) -> None:
    with pytest.raises(ArmlabError, match=r"ladder.depths \[1, 2\] must include model.depth \(3\)"):
        ladder_experiment(tmp_path, depths=(1, 2), depth=3)
    data = ladder_experiment(tmp_path).model_dump(mode="json")
    data["train"].update(target_param_data_ratio=None, num_iterations=100)
    with pytest.raises(ArmlabError, match=r"remove train.num_iterations"):
        parse_experiment(data)
