"""t quantiles and the minimum detectable difference against closed forms and printed tables."""

from __future__ import annotations

import math

import pytest

from armlab.report.stats import detectable, power, seeds_needed, standard_error, t_quantile

Z975, Z80 = 1.959964, 0.841621


def test_t_quantiles() -> None:
    # closed forms: df=1 is Cauchy, tan(0.475 pi); df=2: (2p-1) sqrt(2 / (4p(1-p))) at p=0.975
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), abs=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 * math.sqrt(2 / (4 * 0.975 * 0.025)), abs=1e-9)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)  # printed tables
    assert t_quantile(0.975, None) == pytest.approx(Z975, abs=1e-6)
    assert 3.1824 < t_quantile(0.975, 2.5) < 4.3027  # Welch's non-integer df lands between its neighbours


def test_detectable_difference_matches_the_normal_closed_form_at_large_df() -> None:
    # With many seeds the t test is a z test: MDD = (z_.975 + z_.80) * se, se = sqrt(var / S + item).
    for seed_var, item_var, seeds in [(1.0, 0.0, 100_000), (4e-4, 1e-6, 200_000), (2.5e-5, 0.0, 500_000)]:
        se = math.sqrt(seed_var / seeds + item_var)
        assert detectable(seed_var, item_var, seeds) == pytest.approx((Z975 + Z80) * se, rel=1e-3)


def test_seeds_needed_matches_the_textbook_paired_t_test() -> None:
    # Paired t test, alpha 0.05 two-sided, power 0.8 (noncentral t, as in G*Power or Cohen's tables):
    # effect size delta/sd = 1 needs 10 pairs (power 0.803), 0.5 needs 34.
    assert seeds_needed(1.0, 0.0, 1.0) == 10
    se, df = standard_error(1.0, 0.0, 10)
    assert power(1.0, se, df) == pytest.approx(0.8031, abs=5e-4)
    se, df = standard_error(1.0, 0.0, 9)
    assert power(1.0, se, df) < 0.8
    assert seeds_needed(1.0, 0.0, 0.5) == 34
    # the closed form ((z + z) sd / delta)^2 = 31.4 is the large-sample answer; t costs a few seeds
    assert math.ceil(((Z975 + Z80) / 0.5) ** 2) == 32 < 34


def test_item_noise_sets_a_floor_no_seed_count_passes() -> None:
    # The eval set's own noise does not shrink with seeds: below (z + z) * sqrt(item_var) nothing helps.
    item_var = 1e-4
    floor = (Z975 + Z80) * math.sqrt(item_var)
    assert seeds_needed(1e-3, item_var, 0.9 * floor) is None
    n = seeds_needed(1e-3, item_var, 1.5 * floor)
    assert n is not None and n > 2
    assert detectable(1e-3, item_var, n) <= 1.5 * floor < detectable(1e-3, item_var, n - 1)


def test_no_interval_from_one_seed() -> None:
    assert detectable(1.0, 0.0, 1) is None
