"""Continuous CORE beside accuracy, and Signal and Noise's per-task SNR, on hand-made runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from armlab.report.compare import compare
from armlab.report.continuous import snr
from results_util import make_run, tiny_experiment


def test_snr_is_max_arm_spread_over_mean_checkpoint_std() -> None:
    r = snr([0.30, 0.10, 0.25], [[0.1, 0.2, 0.3], [0.2, 0.2, 0.2], [0.0, 0.1, 0.2]])
    noise = (np.std([0.1, 0.2, 0.3]) + 0 + np.std([0.0, 0.1, 0.2])) / 3
    assert r.signal == pytest.approx(0.20) and r.noise == pytest.approx(noise) and r.snr == pytest.approx(0.2 / noise)
    assert snr([0.3, 0.1], [[0.3], [0.1]]).snr is None  # one checkpoint per run: no noise measured
    flat = snr([0.3, 0.1], [[0.3, 0.3], [0.1, 0.1]])
    assert flat.noise == 0 and flat.snr is None  # no noise at all: no ratio, never flagged


def test_continuous_core_and_low_snr_tasks_in_the_report(tmp_path: Path) -> None:
    exp = tiny_experiment(tmp_path / "wd")
    rng = np.random.default_rng(0)
    n = 40
    for arm, lp_level in (("top", -1.0), ("random", -1.2)):
        for seed in (0, 1):
            tasks, history = {}, [{}, {}, {}]
            for label, shift in (("clear", 0.3), ("noisy", 0.0)):
                lp = list(lp_level * 8 * np.log(2) + rng.normal(0, 0.05, n))  # ~lp_level bits/byte at 8 bytes
                tasks[label] = {
                    "correct": list((rng.random(n) < 0.5 + (shift if arm == "top" else 0)).astype(float)),
                    "random_baseline": 25.0, "logprob": lp, "bytes": [8] * n,
                    "margin": list(rng.normal(0.2 if arm == "top" else 0.0, 0.1, n)),
                }  # fmt: skip
                # "noisy" swings by 0.6 between checkpoints, "clear" by 0.001
                swing = 0.6 if label == "noisy" else 0.001
                for k, h in enumerate(history):
                    h[label] = {"centered": 0.2 + swing * (k % 2), "lp": lp_level + swing * k / 10, "margin": 0.1}
            make_run(exp, arm, seed, bpb=1.5 + 0.01 * seed, core_tasks=tasks, history=history)
    out, s = compare(exp)
    cont = s.continuous
    acc = cont["metrics"]["core"]
    assert acc["tasks"]["noisy"]["flagged"] and not acc["tasks"]["clear"]["flagged"]
    assert acc["kept_tasks"] == ["clear"] and acc["without_flagged"] is not None
    assert acc["tasks"]["clear"]["snr"] > exp.evaluate.min_snr > acc["tasks"]["noisy"]["snr"]
    lp = cont["metrics"]["core_lp"]
    assert lp["all"]["differences"]["top"]["estimate"] == pytest.approx(0.2, abs=0.02)  # bits per byte
    assert lp["all"]["differences"]["top"]["method"] == "seeds+items"  # the same item + seed intervals
    margin = cont["metrics"]["core_margin"]
    assert margin["all"]["differences"]["top"]["low"] > 0
    md = (out / "report.md").read_text()
    assert "## Continuous CORE and signal-to-noise" in md and "(low SNR)" in md
    assert "**without low-SNR tasks** (1)" in md and "CORE log-prob (bits/byte)" in md
