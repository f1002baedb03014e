"""compare refuses what it cannot stand behind, by name (issue 20's compare faults, each
reproduced first): NaN and diverged runs, the odd run out of an engine build, and a summary.json
that JSON readers reject."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.report.compare import compare
from armlab.report.summary import Summary
from report_util import make_summary
from results_util import make_run, tiny_experiment


def strict_json(text: str) -> object:
    """json.loads that rejects NaN / Infinity, as JavaScript's JSON.parse and jq do."""

    def bad(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=bad)


def two_by_two(exp, bpb_top_s1: float = 1.52) -> None:
    make_run(exp, "top", 0, bpb=1.50)
    make_run(exp, "top", 1, bpb=bpb_top_s1)
    make_run(exp, "random", 0, bpb=1.60)
    make_run(exp, "random", 1, bpb=1.63)


def test_a_nan_val_bpb_is_refused_by_name(tmp_path: Path) -> None:
    # Before: compared as "+nan", the verdict said "within noise" and summary.json held a bare NaN.
    exp = tiny_experiment(tmp_path / "wd")
    two_by_two(exp, bpb_top_s1=math.nan)
    with pytest.raises(ArmlabError, match=r"top-s1 \(val bpb nan\): not a finite number.*--exclude top-s1"):
        compare(exp)
    assert not (tmp_path / "wd/report").exists()  # nothing written
    out, s = compare(exp, exclude=["top-s1"])
    strict_json((out / "summary.json").read_text())
    assert [x.run for x in s.excluded] == ["top-s1"]


def test_a_diverged_run_is_refused_by_name_not_left_out(tmp_path: Path) -> None:
    # A run that stopped at a non-finite loss (runs state "diverged") is a result: compare names it
    # instead of quietly comparing the runs that survived.
    exp = tiny_experiment(tmp_path / "wd")
    two_by_two(exp)
    d = make_run(exp, "top", 1, bpb=1.52, state="diverged")
    state = json.loads((d / "state.json").read_text())
    (d / "state.json").write_text(json.dumps({**state, "error": "loss nan at step 7 (last finite 4.1)"}))
    with pytest.raises(ArmlabError, match=r"top-s1: diverged \(loss nan at step 7 .*--exclude top-s1"):
        compare(exp)
    out, s = compare(exp, exclude=["top-s1"])
    assert "Excluded run `top-s1` (arm top): state diverged." in (out / "report.md").read_text()
    assert "1 vs 2 seeds" in s.verdict[0] or "top: 1 of 2 planned seeds finished" in s.verdict[0]


def test_summary_json_is_strict_json_and_reads_back(tmp_path: Path) -> None:
    # Before: atomic_write_json wrote float('nan') as a bare NaN token.
    s = make_summary(data={"arms": {}, "odd": math.nan, "big": math.inf})
    text = s.to_json()
    parsed = strict_json(text)
    assert parsed["data"] == {"arms": {}, "odd": None, "big": None}
    assert Summary.from_json(text).data == parsed["data"]


def test_the_odd_engine_build_out_is_the_one_named(tmp_path: Path) -> None:
    # Three runs on nanochat commit A and one on B: B's run is the odd one, not the other three.
    exp = tiny_experiment(tmp_path / "wd")
    two_by_two(exp)
    for arm, seed in (("top", 0), ("top", 1), ("random", 0), ("random", 1)):
        d = tmp_path / f"wd/arms/{arm}/runs/{arm}-s{seed}"
        info = json.loads((d / "run.json").read_text())
        commit = "bbbbbbb" if (arm, seed) == ("top", 0) else "aaaaaaa"
        info.update(engine={"engine": "nanochat"}, engine_comparable={"commit": commit})
        (d / "run.json").write_text(json.dumps(info))
    with pytest.raises(ArmlabError) as e:
        compare(exp)
    msg = str(e.value)
    assert "1 run is not comparable" in msg
    assert "top-s0 (differs from the other 3 runs (random-s0, random-s1, top-s1) in engine.commit (aaaaaaa vs bbbbbbb))" in msg
    assert "top-s1 (" not in msg and "random-s0 (" not in msg
