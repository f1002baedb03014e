"""Small-sample statistics: t quantiles, and the smallest difference an experiment can detect.

scipy gives the t and noncentral-t distributions at the non-integer degrees of freedom that
Welch-Satterthwaite produces; the power calculation needs the noncentral t (the power of a t test
against a true difference delta is P(|T'| > t_crit) with T' ~ nct(df, delta / se)).

The design being planned: two arms, S seeds each, paired by seed, scored on the same eval items.
A single seed's difference has variance `seed_var` (training noise plus the seed-by-item
interaction; see `intervals`); the eval items add `item_var`, which does not shrink with seeds. So

    se(S)^2 = seed_var / S + item_var,   df(S) = (S - 1) * (se^2 / (seed_var / S))^2

(Satterthwaite with the item part's df infinite), and the minimum detectable difference at
two-sided level alpha and power 1 - beta is the delta where the test's power reaches 1 - beta.
With large df that is the textbook closed form (z_{1-alpha/2} + z_{1-beta}) * se.
"""

from __future__ import annotations

import math

ALPHA = 0.05
POWER = 0.80
MAX_SEEDS = 1000
NORMAL_DF = 1e5


def t_quantile(p: float, df: float | None) -> float:
    """The p quantile of Student's t with `df` degrees of freedom (the normal's when df is None/inf)."""
    from scipy import stats as st  # here, not at the top: scipy costs ~0.7 s of every command's start

    if df is None or df > NORMAL_DF:
        return float(st.norm.ppf(p))
    return float(st.t.ppf(p, df))


def standard_error(seed_var: float, item_var: float, seeds: int) -> tuple[float, float]:
    """(se, df) of a paired mean difference over `seeds` seeds."""
    seed_part = seed_var / seeds
    se2 = seed_part + item_var
    if seed_part <= 0:
        return math.sqrt(se2), math.inf
    return math.sqrt(se2), (seeds - 1) * (se2 / seed_part) ** 2


def power(delta: float, se: float, df: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided level-alpha t test (df) when the true difference is `delta`."""
    if se <= 0:
        return 1.0
    from scipy import stats as st

    crit = t_quantile(1 - alpha / 2, df)
    nc = abs(delta) / se
    if df > NORMAL_DF:  # scipy's nct turns to NaN at huge df; the normal is exact to ~1e-5 there
        return float(st.norm.sf(crit - nc) + st.norm.cdf(-crit - nc))
    lower = float(st.nct.cdf(-crit, df, nc))  # the wrong-sign rejections: tiny, and NaN in some
    return float(st.nct.sf(crit, df, nc)) + (0.0 if math.isnan(lower) else lower)  # scipy corners


def detectable(
    seed_var: float, item_var: float, seeds: int, alpha: float = ALPHA, target: float = POWER
) -> float | None:
    """The smallest true difference detected with probability `target` (None with < 2 seeds,
    where a t test has no degrees of freedom)."""
    if seeds < 2 and seed_var > 0:
        return None
    from scipy import optimize

    se, df = standard_error(seed_var, item_var, seeds)
    if se == 0:
        return 0.0
    # power grows with delta: widen the bracket until it holds the answer (at 1 df and a small
    # alpha, e.g. a sequential design's 0.0125, that is past 100 se)
    hi = 50 * se
    while power(hi, se, df, alpha) < target:
        hi *= 4
    return float(optimize.brentq(lambda d: power(d, se, df, alpha) - target, 1e-9 * se, hi, xtol=1e-12 * se))


def seeds_needed(
    seed_var: float, item_var: float, delta: float, alpha: float = ALPHA, target: float = POWER
) -> int | None:
    """The fewest seeds per arm (>= 2) that detect `delta`, or None when no number of seeds can:
    the eval items' own noise (item_var) already hides it; more or larger eval tasks would."""
    floor = (t_quantile(1 - alpha / 2, None) + t_quantile(target, None)) * math.sqrt(item_var)
    if abs(delta) <= floor:
        return None
    lo, hi = 2, 2
    while (d := detectable(seed_var, item_var, hi, alpha, target)) is not None and d > abs(delta):
        lo, hi = hi, hi * 2
        if hi > MAX_SEEDS:
            return None
    while lo < hi:  # bisect on the monotone detectable(S)
        mid = (lo + hi) // 2
        if detectable(seed_var, item_var, mid, alpha, target) <= abs(delta):
            hi = mid
        else:
            lo = mid + 1
    return hi


def variance_interval(var: float, df: float, level: float = 0.95) -> tuple[float, float]:
    """The `level` interval of a variance estimated with `df` degrees of freedom (chi-square):
    with 3 seeds (2 df) the true variance lies within 0.27x to 39.5x the estimate. A detectable
    difference from 3 seeds is therefore known only to a factor of ~12 (its sd ratio), which is
    why the report gives its range, not one number."""
    from scipy import stats as st

    if var <= 0 or not math.isfinite(df) or df <= 0:
        return var, var
    a = (1 - level) / 2
    return var * df / float(st.chi2.ppf(1 - a, df)), var * df / float(st.chi2.ppf(a, df))
