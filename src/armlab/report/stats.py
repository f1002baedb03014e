"""Means, 95% confidence intervals and arm differences over seeds (Student t).

scipy is not a dependency, so the two-sided 95% t quantile is computed here: the t density
integrated with Simpson's rule (numpy, 4,001 points) and inverted by bisection. It handles the
non-integer degrees of freedom of Welch's test and matches printed tables to 1e-4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


def t_cdf(x: float, df: float) -> float:
    """P(T <= x) for Student's t with `df` degrees of freedom (x >= 0)."""
    grid = np.linspace(0.0, x, 4001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    dens = np.exp(log_c - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = grid[1] - grid[0]
    integral = h / 3 * (dens[0] + dens[-1] + 4 * dens[1:-1:2].sum() + 2 * dens[2:-1:2].sum())
    return 0.5 + float(integral)


def t975(df: float) -> float:
    """Two-sided 95% Student t quantile (the 0.975 quantile) for real df >= 1."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    lo, hi = 1.9, 12.8  # t_0.975 lies between the normal's 1.96 and df=1's 12.706
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Estimate:
    mean: float
    n: int
    half_width: float | None  # 95% CI is mean +- half_width; None with one value

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def as_dict(self) -> dict:
        return {**asdict(self), "low": self.low, "high": self.high}

    def fmt(self, digits: int = 4) -> str:
        if self.half_width is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def _var(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def mean_ci(values: list[float]) -> Estimate:
    """Mean with a 95% t interval (none for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    m = sum(values) / n
    if n == 1:
        return Estimate(m, 1, None)
    return Estimate(m, n, t975(n - 1) * math.sqrt(_var(values) / n))


@dataclass(frozen=True)
class Difference:
    estimate: Estimate  # of (arm - reference)
    method: str  # "paired by seed" | "Welch" | "single runs"
    df: float | None

    @property
    def within_noise(self) -> bool | None:
        """True when the 95% interval contains 0; None when there is no interval to tell."""
        e = self.estimate
        if e.half_width is None:
            return None
        return e.low <= 0.0 <= e.high

    def as_dict(self) -> dict:
        return {
            **self.estimate.as_dict(),
            "method": self.method,
            "df": self.df,
            "within_noise": self.within_noise,
        }


def difference(arm: dict[int, float], ref: dict[int, float]) -> Difference:
    """arm - ref, from per-seed values. Paired by seed when both have the same >= 2 seeds (the
    seed fixes init and data order, so pairing removes that shared noise); else Welch's t."""
    if set(arm) == set(ref) and len(arm) >= 2:
        d = [arm[s] - ref[s] for s in sorted(arm)]
        return Difference(mean_ci(d), "paired by seed", len(d) - 1)
    a, b = list(arm.values()), list(ref.values())
    m = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(Estimate(m, min(len(a), len(b)), None), "single runs", None)
    va, vb = _var(a) / len(a), _var(b) / len(b)
    se2 = va + vb
    if se2 == 0:
        return Difference(Estimate(m, min(len(a), len(b)), 0.0), "Welch", None)
    df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return Difference(Estimate(m, min(len(a), len(b)), t975(df) * math.sqrt(se2)), "Welch", df)
