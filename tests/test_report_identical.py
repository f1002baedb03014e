"""Seeds that changed nothing (issue 19: the nanochat engine trained seeds 0 and 1 identically) are
detected by their loss curves, named, and counted once; and no interval of zero width is a verdict."""

from __future__ import annotations

from pathlib import Path

from armlab.report.compare import compare
from armlab.report.identical import identical_groups
from armlab.report.intervals import difference_interval
from armlab.runs import load_run
from results_util import make_run, tiny_experiment


def test_identical_seeds_are_named_and_counted_once(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    # top's two seeds are one run in effect (same curve, same final bpb); random's differ
    a = make_run(exp, "top", 0, bpb=1.5001, loss_offset=0.0)
    b = make_run(exp, "top", 1, bpb=1.5001, loss_offset=0.0)
    make_run(exp, "random", 0, bpb=1.5000)
    make_run(exp, "random", 1, bpb=1.5003)
    assert [[r.run for r in g] for g in identical_groups([load_run(a), load_run(b)])] == [["top-s0", "top-s1"]]
    _, s = compare(exp)
    assert [r["run"] for r in s["arms"]["top"]["runs"]] == ["top-s0"]  # counted once
    assert any("top-s1 is identical to top-s0" in w and "counted once" in w for w in s["warnings"]), s["warnings"]
    (c,) = [c for c in s["comparisons"] if c["metric"] == "val_bpb"]
    assert not c["paired"] and c["seeds"] == [1, 2]  # one top run against random's two: not a paired design


def test_all_seeds_identical_in_both_arms_gives_no_verdict(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5001, loss_offset=0.0)
        make_run(exp, "random", seed, bpb=1.5000, loss_offset=0.01)
    _, s = compare(exp)
    (line,) = s["verdict"]
    assert "no interval" in line and "beats" not in line and "loses" not in line, line


def test_a_zero_width_interval_is_no_interval() -> None:
    # two seeds per arm, the same difference in both, no per-item data: zero measured noise
    iv = difference_interval({0: 1.5001, 1: 1.5001}, {0: 1.5000, 1: 1.5000})
    assert iv.low is None and iv.high is None and iv.method == "none"
    assert iv.excludes_zero is None
