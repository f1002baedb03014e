"""armlab.decide: which arms get one more seed, when the loop stops and why, and the seeds it adds
going into the run set that compare and the schedule see."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from armlab.decide import next_round, record, run_until_decided
from armlab.ops.schedule import local_host, plan_schedule
from armlab.report.compare import analyse
from armlab.seeds import planned_runs, planned_seeds
from results_util import make_run, tiny_experiment


def runs(exp, seeds, effect: float, noise: float = 0.01, docs: int = 200, rng_seed: int = 0) -> None:
    """top's per-byte loss differs from random's by `effect` (relative); each seed moves it by `noise`."""
    rng = np.random.default_rng(rng_seed)
    nbytes = rng.integers(200, 800, docs).astype(float)
    base = rng.uniform(0.8, 1.2, docs)
    for s in seeds:
        srng = np.random.default_rng(1000 + s)
        for arm, eff in (("top", effect), ("random", 0.0)):
            rate = base * (1 + eff) * (1 + srng.normal(0, noise)) * (1 + srng.normal(0, 0.002, docs))
            make_run(exp, arm, s, bpb=0.0, per_doc=((rate * nbytes).tolist(), nbytes.tolist()))


def test_a_clear_difference_is_decided_without_more_seeds(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1, 2])
    runs(exp, [0, 1, 2], effect=-0.10)
    summary, _ = analyse(exp)
    add, (d,) = next_round(exp, summary, max_seeds=6)
    assert add == {} and d.state == "decided" and d.line.startswith("top vs random: decided on val bpb with 3 seeds")
    assert "98.75% CI" in d.line  # Bonferroni over the 4 looks 3..6 seeds can take


def test_a_difference_within_noise_gets_a_seed_for_both_arms_and_compare_accepts_it(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1])
    runs(exp, [0, 1], effect=-0.012, noise=0.01)
    summary, _ = analyse(exp)
    add, (d,) = next_round(exp, summary, max_seeds=8)
    assert d.state == "more" and "within noise at 99.29% with 2 seeds" in d.line
    assert add == {"random": 2, "top": 2}  # the reference too: the design stays paired
    record(exp, summary, add, [d], 8)
    saved = json.loads((tmp_path / "wd/seeds.json").read_text())
    assert saved["arms"] == {"random": [2], "top": [2]} and saved["rounds"][0]["added"] == add
    assert planned_seeds(exp) == {"top": [0, 1, 2], "random": [0, 1, 2]}
    assert ("top", 2, "top-s2") in planned_runs(exp)
    # the schedule places the added seed after train.seeds, so earlier runs keep their lanes
    host = local_host(exp, ["top", "random"], device="cpu", visible_gpus=0, runs_at_once=2)
    before = plan_schedule(exp, [host]).slots
    after = plan_schedule(exp, [host], seeds=planned_seeds(exp)).slots
    assert after[: len(before)] == before and [s.run for s in after[len(before):]] == ["top-s2", "random-s2"]
    runs(exp, [0, 1, 2], effect=-0.012, noise=0.01)
    summary, _ = analyse(exp)  # seed 2 is planned now: no "not in train.seeds" refusal
    assert summary.arms["top"].planned_seeds == [0, 1, 2] and summary.arms["top"].seeds == [0, 1, 2]
    # the differences are now at the sequential level: 95% over the 7 looks 2..8 seeds can take
    iv = summary.comparison("top", "val_bpb").interval
    assert iv.level == pytest.approx(1 - 0.05 / 7) and f"{100 * iv.level:.4g}% CI" in summary.verdict[0]


def test_a_difference_no_affordable_seed_count_resolves_stops_with_the_bound(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1, 2])
    runs(exp, [0, 1, 2], effect=-0.0005, noise=0.02)
    summary, _ = analyse(exp)
    add, (d,) = next_round(exp, summary, max_seeds=4)
    assert add == {} and d.state == "cannot"
    assert d.line.startswith("top vs random: cannot be decided within 4 seeds: |difference| < 0.")


def test_the_loop_adds_seeds_until_it_stops(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1])
    runs(exp, [0, 1], effect=-0.02, noise=0.01)
    said: list[str] = []
    rounds: list[dict] = []

    def train_round(add: dict[str, int]):
        rounds.append(add)
        seeds = sorted({s for v in planned_seeds(exp).values() for s in v})
        runs(exp, seeds, effect=-0.02, noise=0.01)
        return analyse(exp)[0]

    last = run_until_decided(exp, 5, analyse(exp)[0], train_round, said.append)
    assert rounds and all(set(r) == {"top", "random"} for r in rounds)
    assert [list(r.values())[0] for r in rounds] == list(range(2, 2 + len(rounds)))
    assert said[-1].startswith("decide: stop: ")
    assert len(last.arms["top"].runs) == 2 + len(rounds) <= 5
    with pytest.raises(Exception, match="--max-seeds 1 is fewer than train.seeds"):
        run_until_decided(exp, 1, last, train_round, said.append)
