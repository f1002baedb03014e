"""How fast and how honest the report's intervals are.

    python bench/intervals.py                 # timing at realistic sizes + coverage table
    python bench/intervals.py --experiments 500 --skip-timing

Timing: CORE as 22 tasks x 500 items x 5 seeds per arm, val bpb as 20,000 eval documents x
5 seeds per arm, 2,000 paired resamples (`armlab.report.intervals.RESAMPLES`), median of 5.

Coverage: simulated experiments with a known true difference (`tests/report_util.py`: fresh eval
items and fresh seeds each time) in several noise regimes; the share of 95% intervals that cover
the truth, for armlab's interval and, for contrast, a two-stage percentile bootstrap (resample
seeds, then items), which is what "bootstrap over seeds and items" gives when done naively.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from armlab.report.intervals import (  # noqa: E402
    RESAMPLES,
    ItemScores,
    Stratum,
    difference_interval,
    replicates,
)
from report_util import bpb_experiment, core_experiment, off_model_bpb_experiment  # noqa: E402


def interval(a: ItemScores, b: ItemScores, resamples: int, seed: int):
    ra, rb = replicates([a, b], resamples, seed)
    return difference_interval(
        dict(zip(a.seeds, a.values(), strict=True)),
        dict(zip(b.seeds, b.values(), strict=True)),
        ra * a.weight,
        rb * b.weight,
        [s.items for s in a.strata],
    )


def naive(a: ItemScores, b: ItemScores, resamples: int, seed: int) -> tuple[float, float]:
    """Two-stage percentile bootstrap: seeds drawn with replacement (paired when the arms ran the
    same seeds), then items (the same item draws for both arms)."""
    ra, rb = replicates([a, b], resamples, seed)
    va, vb = (ra * a.weight).sum(2), (rb * b.weight).sum(2)  # (B, S)
    rng = np.random.default_rng(seed + 1)
    if va.shape == vb.shape:
        pick = rng.integers(0, va.shape[1], va.shape)
        stat = np.take_along_axis(va - vb, pick, 1).mean(1)
    else:
        pa, pb = rng.integers(0, va.shape[1], va.shape), rng.integers(0, vb.shape[1], vb.shape)
        stat = np.take_along_axis(va, pa, 1).mean(1) - np.take_along_axis(vb, pb, 1).mean(1)
    return float(np.quantile(stat, 0.025)), float(np.quantile(stat, 0.975))


def timing() -> None:
    rng = np.random.default_rng(0)

    def core_arm() -> ItemScores:
        strata = tuple(
            Stratum(f"t{k}", (rng.random((5, 500)) < 0.5).astype(np.float64), np.ones(500), 4 / 3, -1 / 3)
            for k in range(22)
        )
        return ItemScores(tuple(range(5)), strata, 1 / 22)

    def bpb_arm() -> ItemScores:
        length = rng.lognormal(7, 1, 20_000)
        nats = length * rng.uniform(0.6, 1.0, (5, 20_000))
        return ItemScores(tuple(range(5)), (Stratum("eval", nats, length, 1 / np.log(2)),))

    for name, make in (
        ("CORE 22 tasks x 500 items x 5 seeds", core_arm),
        ("val bpb 20,000 docs x 5 seeds", bpb_arm),
    ):
        a, b = make(), make()
        times = []
        for i in range(5):
            t0 = time.perf_counter()
            interval(a, b, RESAMPLES, i)
            times.append(time.perf_counter() - t0)
        print(f"{name}: {RESAMPLES:,} paired resamples in {statistics.median(times):.3f} s (median of 5)")


REGIMES = [
    ("CORE, 3 seeds, default noise", core_experiment, {}),
    ("CORE, 5 seeds", core_experiment, {"seeds_a": 5, "seeds_b": 5}),
    ("CORE, 2 seeds (weak)", core_experiment, {"seeds_a": 2, "seeds_b": 2}),
    ("CORE, 3 seeds, no seed effect", core_experiment, {"seed_sd": 0.0}),
    ("CORE, 3 seeds, strong item effect", core_experiment, {"item_sd": 0.2, "seed_sd": 0.0}),
    ("CORE, 3 seeds, seed-dominated", core_experiment, {"seed_sd": 0.08, "seed_corr": 0.0}),
    ("CORE, 3 vs 2 seeds (Welch)", core_experiment, {"seeds_a": 3, "seeds_b": 2}),
    ("val bpb, 3 seeds", bpb_experiment, {}),
    ("val bpb, 5 seeds", bpb_experiment, {"seeds": 5}),
    ("val bpb, 3 seeds, documents only", bpb_experiment, {"noise_sd": 0.0, "seed_sd": 0.0}),
    ("val bpb, 3 seeds, seed-dominated", bpb_experiment, {"seed_sd": 0.05, "noise_sd": 0.01}),
    ("val bpb, 2 seeds (weak)", bpb_experiment, {"seeds": 2}),
    # off the model: a two-type eval set (prose and junk) with opposite arm effects, heavy tails,
    # seeds better on one type and worse on the other (tests/report_util.off_model_bpb_experiment)
    ("off-model: bimodal documents", off_model_bpb_experiment, {}),
    ("off-model: heavy tails", off_model_bpb_experiment, {"heavy": True}),
    ("off-model: seed x document type", off_model_bpb_experiment, {"interaction_sd": 0.03}),
    ("off-model: all three", off_model_bpb_experiment, {"heavy": True, "interaction_sd": 0.03}),
    ("off-model: all three, 5 seeds", off_model_bpb_experiment, {"heavy": True, "interaction_sd": 0.03, "seeds": 5}),
]


def coverage(experiments: int, resamples: int) -> None:
    print(
        f"\ncoverage of the 95% interval over {experiments:,} simulated experiments ({resamples} resamples each)"
    )
    print(f"{'regime':38s} {'armlab':>7s} {'naive':>7s} {'mean width':>11s} {'no interval':>12s}")
    for name, make, kw in REGIMES:
        rng = np.random.default_rng(1)
        ours = theirs = none = 0
        widths = []
        for e in range(experiments):
            a, b, true = make(rng, **kw)
            iv = interval(a, b, resamples, e)
            lo, hi = naive(a, b, resamples, e)
            theirs += lo <= true <= hi
            if iv.low is None:  # no noise measured at all: no interval, so no claim (counted as a miss)
                none += 1
                continue
            ours += iv.low <= true <= iv.high
            widths.append(iv.high - iv.low)
        print(f"{name:38s} {ours / experiments:7.1%} {theirs / experiments:7.1%} {np.mean(widths):11.4f} {none:12,d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experiments", type=int, default=2000)
    p.add_argument("--resamples", type=int, default=200)
    p.add_argument("--skip-timing", action="store_true")
    args = p.parse_args()
    if not args.skip_timing:
        timing()
    coverage(args.experiments, args.resamples)
    replicate_seeds_table(args.experiments, args.resamples)


def replicate_seeds_table(experiments: int, resamples: int) -> None:
    """Seeds that are one run repeated: what an interval from them would cover, and how often
    compare's detector (`intervals.replicate_seeds`) refuses them / flags independent seeds."""
    from armlab.report.intervals import replicate_seeds

    rng = np.random.default_rng(1)
    covered = refused = false = 0
    for e in range(experiments):
        a, b, true = off_model_bpb_experiment(rng, replicate=True, seed_sd=0.015)
        iv = interval(a, b, resamples, e)
        covered += iv.low is not None and iv.low <= true <= iv.high
        refused += bool(replicate_seeds(a)) and bool(replicate_seeds(b))
        x, y, _ = off_model_bpb_experiment(rng, seed_sd=0.015)
        false += bool(replicate_seeds(x) or replicate_seeds(y))
    print(
        f"\nreplicate seeds (3 copies of one run per arm), {experiments:,} experiments: an interval would cover "
        f"{covered / experiments:.1%}; compare refuses {refused / experiments:.1%}; independent seeds flagged: "
        f"{false / experiments:.1%}"
    )


if __name__ == "__main__":
    main()
