"""compare: refusals, intervals, and the report files, on hand-made run dirs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.report.compare import compare
from armlab.report.stats import difference, mean_ci, t975
from results_util import make_run, tiny_experiment


def test_t_quantiles() -> None:
    # closed forms: df=1 is Cauchy, tan(0.475 pi); df=2: (2p-1) sqrt(2 / (4p(1-p))) at p=0.975
    assert t975(1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-4)
    assert t975(2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), abs=1e-4)
    assert t975(10) == pytest.approx(2.2281, abs=1e-4)  # printed tables
    assert t975(35) == pytest.approx(2.0301, abs=1e-4)
    assert t975(1e9) == pytest.approx(1.9600, abs=1e-4)
    assert 3.1824 < t975(2.5) < 4.3027  # Welch's non-integer df lands between its neighbours


def test_mean_ci_and_differences() -> None:
    e = mean_ci([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.half_width == pytest.approx(t975(2) * 1.0 / math.sqrt(3))
    assert mean_ci([5.0]).half_width is None
    # paired by seed: the per-seed differences are 0.1, 0.12, 0.08 -> a tight interval away from 0
    d = difference({0: 1.1, 1: 1.32, 2: 0.88}, {0: 1.0, 1: 1.2, 2: 0.8})
    assert d.method == "paired by seed" and d.estimate.mean == pytest.approx(0.1)
    assert d.estimate.half_width == pytest.approx(t975(2) * 0.02 / math.sqrt(3))
    assert d.within_noise is False
    w = difference({0: 1.0, 1: 1.2}, {5: 1.1, 6: 1.0, 7: 0.9})
    assert w.method == "Welch" and w.within_noise is True
    assert difference({0: 1.0}, {0: 2.0}).within_noise is None


def test_report_with_seeds(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed, (bt, br) in enumerate([(1.50, 1.60), (1.52, 1.61)]):
        make_run(exp, "top", seed, bpb=bt, core=0.10 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=br, core=0.05 + 0.01 * seed)
    make_run(exp, "random", 7, bpb=9.9, state="running")  # unfinished: excluded, never averaged in
    out, summary = compare(exp)
    for name in ("report.md", "report.html", "summary.json", "curves.png", "final.png", "core_tasks.png"):
        assert (out / name).stat().st_size > 0, name
    s = json.loads((out / "summary.json").read_text())
    assert s["reference_arm"] == "random"
    assert s["arms"]["top"]["val_bpb"]["mean"] == pytest.approx(1.51)
    assert s["arms"]["top"]["val_bpb"]["half_width"] == pytest.approx(
        t975(1) * 0.01 / math.sqrt(2) * math.sqrt(2), rel=1e-3
    )
    bpb = next(c for c in s["comparisons"] if c["metric"] == "val_bpb")
    assert bpb["method"] == "paired by seed" and bpb["mean"] == pytest.approx(-0.095)
    assert "top is better than random on val bpb" in bpb["verdict"]
    assert [x["run"] for x in s["excluded"]] == ["random-s7"]
    md = (out / "report.md").read_text()
    assert "CORE (demo tasks)" in md and "| top | top | 0,1 |" in md
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and 'src="curves.png"' not in html


def test_within_noise_is_said_plainly(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed, (bt, br) in enumerate([(1.50, 1.52), (1.55, 1.51)]):
        make_run(exp, "top", seed, bpb=bt)
        make_run(exp, "random", seed, bpb=br)
    _, s = compare(exp)
    (c,) = s["comparisons"]
    assert c["within_noise"] is True and "within noise" in c["verdict"]


def test_refusals(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    with pytest.raises(ArmlabError, match="no finished runs"):
        compare(exp)
    make_run(exp, "top", 0, bpb=1.5, state="failed")
    with pytest.raises(ArmlabError, match=r"no finished runs to compare \(top-s0: failed\)"):
        compare(exp)
    other = json.loads(json.dumps(exp.comparability()))
    other["train"]["matrix_lr"] = 0.05
    other["model"]["depth"] = 4
    make_run(exp, "top", 0, bpb=1.5, comparability=other)
    make_run(exp, "random", 0, bpb=1.6)
    with pytest.raises(ArmlabError, match=r"differs in model\.depth, train\.matrix_lr"):
        compare(exp)
    make_run(exp, "top", 0, bpb=1.5, experiment="someone-else")
    with pytest.raises(ArmlabError, match="belongs to experiment 'someone-else'"):
        compare(exp)
    make_run(exp, "top", 0, bpb=1.5, core=0.1, bundle_sha="1" * 16)
    make_run(exp, "random", 0, bpb=1.6, core=0.1, bundle_sha="2" * 16)
    with pytest.raises(ArmlabError, match="different bundles"):
        compare(exp)


def test_repeated_seed_is_refused_not_counted_twice(tmp_path: Path) -> None:
    # A second run of the same arm and seed (e.g. `train --run-name again`) is the same sample again;
    # averaging it in would shrink the interval (pseudo-replication), so compare names it and stops.
    exp = tiny_experiment(tmp_path / "wd")
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=1.6 + 0.01 * seed)
    again = make_run(exp, "top", 0, bpb=1.5).parent / "top-again"
    shutil.copytree(again.parent / "top-s0", again)
    info = json.loads((again / "run.json").read_text())
    (again / "run.json").write_text(json.dumps({**info, "run": "top-again"}))
    with pytest.raises(ArmlabError, match=r"share a seed \(arm 'top' seed 0: top-again, top-s0\)"):
        compare(exp)
    shutil.rmtree(again)
    _, summary = compare(exp)
    assert summary["arms"]["top"]["val_bpb"]["n"] == 2


def test_every_incomparable_run_is_named_at_once(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    other = json.loads(json.dumps(exp.comparability()))
    other["train"]["matrix_lr"] = 0.05
    a = make_run(exp, "top", 0, bpb=1.5, comparability=other)
    b = make_run(exp, "random", 0, bpb=1.6, comparability=other)
    with pytest.raises(ArmlabError, match=r"2 run\(s\) are not comparable") as e:
        compare(exp)
    assert str(a) in str(e.value) and str(b) in str(e.value) and "train.matrix_lr" in str(e.value)


def test_exclude_leaves_named_runs_out(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=1.6 + 0.01 * seed)
    other = json.loads(json.dumps(exp.comparability()))
    other["train"]["num_iterations"] = 5
    smoke = make_run(exp, "top", 2, bpb=9.0, comparability=other)  # a quick smoke test with overrides
    with pytest.raises(ArmlabError, match=r"--exclude RUN"):
        compare(exp)
    _, summary = compare(exp, exclude=[smoke.name])
    assert summary["arms"]["top"]["val_bpb"]["n"] == 2
    with pytest.raises(ArmlabError, match=r"--exclude: no run named nope"):
        compare(exp, exclude=["nope"])


def test_runs_of_two_engine_builds_are_refused(tmp_path: Path) -> None:
    """What an engine resolved at run time (e.g. a nanochat commit) must match across runs."""
    exp = tiny_experiment(tmp_path / "wd")
    for arm, commit in (("top", "92d63d4"), ("random", "48804bf")):
        d = make_run(exp, arm, 0, bpb=1.5)
        info = json.loads((d / "run.json").read_text())
        info.update(engine={"engine": "nanochat"}, engine_comparable={"commit": commit})
        (d / "run.json").write_text(json.dumps(info))
    with pytest.raises(
        ArmlabError, match=r"top-s0 \(differs from random-s0 in engine\.commit \(48804bf vs 92d63d4\)\)"
    ):
        compare(exp)
