"""compare: refusals, intervals, and the report files, on hand-made run dirs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.report.compare import compare
from armlab.report.stats import t_quantile
from armlab.report.summary import Summary
from results_util import make_run, tiny_experiment


def test_report_with_seeds(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed, (bt, br) in enumerate([(1.50, 1.60), (1.52, 1.61)]):
        make_run(exp, "top", seed, bpb=bt, core=0.10 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=br, core=0.05 + 0.02 * seed)
    make_run(exp, "random", 7, bpb=9.9, state="running")  # unfinished: excluded, never averaged in
    out, summary = compare(exp)
    for name in ("report.md", "report.html", "summary.json", "curves.png", "final.png", "core_tasks.png",
                 "differences.png"):
        assert (out / name).stat().st_size > 0, name
    s = Summary.from_json((out / "summary.json").read_text())
    assert s == summary.with_(created=s.created)  # the file reads back to the same record
    assert s.reference_arm == "random"
    top = s.arms["top"].val_bpb
    assert top.estimate == pytest.approx(1.51) and top.method == "seeds"  # no per-document data
    assert top.half_width == pytest.approx(t_quantile(0.975, 1) * 0.01 / math.sqrt(2) * math.sqrt(2), rel=1e-6)
    bpb = s.comparison("top", "val_bpb").interval
    assert bpb.paired and bpb.estimate == pytest.approx(-0.095)
    (line,) = s.verdict
    assert line.startswith("top vs random: CORE within noise (+0.045") and "2 seeds, weak" in line
    assert "val bpb better by -0.095" in line
    assert [x.run for x in s.excluded] == ["random-s7"]
    md = (out / "report.md").read_text()
    assert f"- {line}" in md and "CORE (demo tasks)" in md and "| top | top | 0,1 |" in md
    html = (out / "report.html").read_text()
    assert line in html.replace("&#x27;", "'")
    assert html.count("data:image/png;base64,") == 4 and 'src="curves.png"' not in html


def test_within_noise_is_said_plainly(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    for seed, (bt, br) in enumerate([(1.50, 1.52), (1.55, 1.51)]):
        make_run(exp, "top", seed, bpb=bt)
        make_run(exp, "random", seed, bpb=br)
    _, s = compare(exp)
    (c,) = s.comparisons
    c = c.interval
    assert c.low < 0 < c.high
    assert s.verdict == [
        f"top vs random: val bpb within noise ({c.estimate:+.3f}, 95% CI {c.low:+.3f} to "
        f"{c.high:+.3f}, 2 seeds, weak, seed noise only)"
    ]


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
    assert summary.arms["top"].val_bpb.seeds == (2,)


def test_every_incomparable_run_is_named_at_once(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    other = json.loads(json.dumps(exp.comparability()))
    other["train"]["matrix_lr"] = 0.05
    a = make_run(exp, "top", 0, bpb=1.5, comparability=other)
    b = make_run(exp, "random", 0, bpb=1.6, comparability=other)
    with pytest.raises(ArmlabError, match=r"2 runs are not comparable") as e:
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
    assert summary.arms["top"].val_bpb.seeds == (2,)
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
        ArmlabError, match=r"top-s0 \(differs from random-s0 in engine\.commit \(48804bf vs 92d63d4\) \(no build has most"
    ):
        compare(exp)


def test_one_arm_only_is_refused(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    make_run(exp, "top", 0, bpb=1.5)
    make_run(exp, "top", 1, bpb=1.52)
    make_run(exp, "random", 0, bpb=1.6, state="running")
    with pytest.raises(
        ArmlabError,
        match=r"only arm 'top' has finished runs \(random: random-s0: running\); nothing to compare",
    ):
        compare(exp)
    assert not (exp.workdir_path / "report").exists()


def test_seeds_outside_train_seeds_are_refused(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")  # train.seeds = [0, 1]
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=1.6 + 0.02 * seed)
    make_run(exp, "random", 7, bpb=1.6)
    with pytest.raises(
        ArmlabError, match=r"random-s7 \(seed 7\): not in train\.seeds \[0, 1\].*--exclude random-s7"
    ):
        compare(exp)
    _, s = compare(exp, exclude=["random-s7"])
    assert s.arms["random"].val_bpb.seeds == (2,)


def test_unequal_seed_counts_are_unpaired_and_warned(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1, 2])
    for seed in (0, 1, 2):
        make_run(exp, "top", seed, bpb=1.50 + 0.01 * seed)
    for seed in (0, 1):
        make_run(exp, "random", seed, bpb=1.60 + 0.01 * seed)
    _, s = compare(exp)
    (c,) = s.comparisons
    assert not c.interval.paired and c.interval.seeds == (3, 2)
    assert "top: 2 of 3 planned seeds finished" not in s.verdict[0]  # top has all three
    assert "random: 2 of 3 planned seeds finished" in s.verdict[0] and "unpaired" in s.verdict[0]
    assert any("unequal seed counts: top has 3 finished runs, random 2" in w for w in s.warnings)


def core_items(rng, p: float, n: int = 60) -> dict:
    """Two tasks of n items; item i's chance of being right is p + a fixed per-item offset (so the
    items themselves differ, as real ones do), the outcome a fresh draw per run."""
    offsets = [((i * 37) % 11 - 5) / 12 for i in range(n)]
    draw = lambda: [int(rng.random() < min(1.0, max(0.0, p + o))) for o in offsets]  # noqa: E731
    return {
        "t1": {"correct": draw(), "random_baseline": 25.0},
        "t2": {"correct": draw(), "random_baseline": 50.0},
    }


def test_per_item_data_puts_eval_noise_in_every_figure(tmp_path: Path) -> None:
    import random

    rng = random.Random(0)
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1, 2])
    nbytes = [rng.randint(200, 2000) for _ in range(50)]
    for seed in (0, 1, 2):
        for arm, p, rate in (("top", 0.75, 0.9), ("random", 0.55, 1.0)):
            nats = [b * rate * rng.uniform(0.9, 1.1) for b in nbytes]
            items = core_items(rng, p)
            if arm == "top":  # top's gain is concentrated on the second half of the items
                for t in items.values():
                    t["correct"] = t["correct"][:30] + [int(rng.random() < 0.95) for _ in range(30)]
            make_run(exp, arm, seed, bpb=0.0, core_tasks=items, per_doc=(nats, nbytes))
    _, s = compare(exp)
    for c in s.comparisons:
        iv = c.interval
        assert iv.method == "seeds+items" and iv.paired and iv.item_var > 0, c.metric
        assert 0 < c.detectable.low < c.detectable.value < c.detectable.high
    top = s.arms["top"]
    assert top.core.method == "seeds+items"
    cell = top.core_tasks["t2"]
    assert cell.method == "seeds+items" and cell.low < cell.estimate < cell.high <= 1.0
    assert top.eval.val_bpb_docs == 50 and top.eval.core_items == {"t1": 60, "t2": 60}
    assert s.verdict[0].startswith("top beats random on CORE by +") and "val bpb better by -" in s.verdict[0]
    assert not s.warnings
    # an older run without per-item data: that metric falls back to seeds only, and says so
    ev = tmp_path / "wd/arms/random/runs/random-s2/eval.json"
    data = json.loads(ev.read_text())
    del data["val_bpb_per_doc"]
    ev.write_text(json.dumps(data))
    _, s = compare(exp)
    methods = {c.metric: c.interval.method for c in s.comparisons}
    assert methods == {"core": "seeds+items", "val_bpb": "seeds"}
    assert "seed noise only" in s.verdict[0] or "seeds only" in s.verdict[0]
    assert any("no per-document val bpb in eval.json of random-s2" in w for w in s.warnings)


def test_runs_scored_on_different_items_are_refused(tmp_path: Path) -> None:
    import random

    rng = random.Random(1)
    exp = tiny_experiment(tmp_path / "wd")
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5, core_tasks=core_items(rng, 0.7))
        make_run(exp, "random", seed, bpb=1.6, core_tasks=core_items(rng, 0.5, n=40 if seed else 60))
    with pytest.raises(ArmlabError, match=r"random-s1/eval\.json: CORE task 't1' was scored on other items"):
        compare(exp)
