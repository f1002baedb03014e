"""95% intervals that count both sources of noise in an arm's score: training seeds and eval items.

A run's CORE or val bpb is a finite eval set scored by one seed's model. Both are samples: another
seed trains another model, another draw of items from the same population scores differently. Per
stratum (a CORE task, or the whole eval set for bpb) the crossed random-effects model is

    x[s, i] = mu + a_s + b_i + e_si      (s: seed, i: item)

so the mean over S seeds and I items has Var = sa^2/S + sb^2/I + se^2/(S I). It is estimated in two
parts (the variance components of a crossed design, e.g. Searle, Casella & McCulloch, "Variance
Components", ch. 4):

- **seeds**: the variance over seeds of the per-seed values, / S. Each per-seed value averages the
  same items, so this already holds sa^2/S + se^2/(S I). Paired by seed when both arms ran the same
  seeds (a seed fixes init and data order, so pairing removes that shared noise), else Welch.
- **items**: the shared item effect sb^2/I, from a paired bootstrap over the items of each stratum
  (the same item draws for every seed and both arms, so item difficulty cancels in a difference).
  The bootstrap variance of the seed mean, V_mean, holds sb^2/I + se^2/(S I); that of a single
  seed, V_s, holds sb^2/I + se^2/I. The interaction is already in the seed part, so it is removed:
  sb^2/I = (S V_mean - mean_s V_s) / (S - 1).

The two half-widths, t (seed df) for the seed part and normal for the item part, are combined
as a p-norm, (h_seed^p + h_item^p)^(1/p) (`_finish`); the interval is clipped to the range the
quantity can take. Each half-width alone is exact when its part is all the noise (p does not
matter there); in between, adding them in quadrature (p = 2) over-covers, up to 97.7% with 3
seeds and 98.7% with 2, because the t quantile's allowance for a 2-df seed variance is then
applied to only part of the noise. p grows as the seed df shrinks (`P_NORM`, found numerically:
the p that keeps the coverage closest to 95% over every split of the noise between seeds and
items), which holds it within 94.6-95.4% from 3 seeds on (2 seeds: 95-97.7%), checked by
`tests/test_report_intervals.py`; the simulations there, on and off the model (bimodal documents,
heavy tails, seed-by-document-type effects), cover 93-97%.

Why not a percentile bootstrap over seeds as well (resample seeds, then items): it counts the
interaction twice (too wide when item noise dominates: 99% coverage) and has only 10 distinct seed
resamples with 3 seeds, (S-1)/S of the variance (too narrow when seed noise dominates: 74-85%);
`bench/intervals.py` prints both in several regimes.

The bootstrap uses Poisson(1) weights per item (Hanley & MacGibbon 2006; equivalent to the
multinomial bootstrap for ratio statistics, and cheap to draw: 2 random bytes an item through an
inverse-CDF table), in fixed-size chunks (memory bounded), from a seeded generator: the same
inputs give the same interval on every call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from armlab.report.stats import t_quantile

RESAMPLES = 2000
SEED = 20240229  # any fixed value: reports are reproducible
CHUNK_WEIGHTS = 1 << 22  # item weights drawn at once (16 MiB of float32)
WEAK_BELOW = 3  # fewer seeds per arm than this: the interval is said to be weak
LEVEL = 0.95
# seed df -> p of the p-norm combining the two half-widths (see the module docstring); linear in
# between, 2 (quadrature) from 20 df on
P_NORM = ((1.0, 12.0), (1.5, 12.0), (2.0, 6.5), (2.5, 4.0), (3.0, 3.25), (4.0, 2.75), (5.0, 2.5),
          (8.0, 2.25), (12.0, 2.25), (20.0, 2.0))  # fmt: skip


def combine_p(df: float | None) -> float:
    """The p for a seed part with `df` degrees of freedom (`P_NORM`)."""
    if df is None or math.isinf(df) or df >= P_NORM[-1][0]:
        return 2.0
    xs, ps = zip(*P_NORM, strict=True)
    return float(np.interp(df, xs, ps))


def _poisson_table() -> np.ndarray:
    """Poisson(1) inverse CDF at the midpoints of 2^16 equal steps (mean 1.0000, variance 1.0000)."""
    k = np.arange(16)
    pmf = np.exp(-1.0) / np.array([math.factorial(int(x)) for x in k])
    u = (np.arange(1 << 16) + 0.5) / (1 << 16)
    return np.searchsorted(np.cumsum(pmf), u).astype(np.float32)


POISSON = _poisson_table()


@dataclass(frozen=True)
class Stratum:
    """Items scored alike: value(seed) = offset + scale * sum_i num[s, i] / sum_i den[i]."""

    label: str
    num: np.ndarray  # (S, I): CORE: correct 0/1; bpb: nats per document
    den: np.ndarray  # (I,) or (S, I): CORE: ones; bpb: bytes per document
    scale: float = 1.0
    offset: float = 0.0

    @property
    def items(self) -> int:
        return self.num.shape[1]

    def values(self) -> np.ndarray:
        den = self.den.sum(-1)
        return self.offset + self.scale * self.num.sum(1) / den


@dataclass(frozen=True)
class ItemScores:
    """One arm's per-item scores for one metric: metric(seed) = sum_k weight * stratum_k(seed)."""

    seeds: tuple[int, ...]
    strata: tuple[Stratum, ...]
    weight: float = 1.0  # CORE: 1 / number of tasks (the mean of the centred task scores)

    def stratum_values(self) -> np.ndarray:
        """(S, K) per seed and stratum."""
        return np.stack([s.values() for s in self.strata], axis=1)

    def values(self) -> np.ndarray:
        return self.weight * self.stratum_values().sum(1)

    def take(self, seeds: Sequence[int]) -> ItemScores:
        """The same scores restricted to (and ordered by) `seeds`."""
        rows = [self.seeds.index(s) for s in seeds]
        strata = tuple(
            Stratum(s.label, s.num[rows], s.den if s.den.ndim == 1 else s.den[rows], s.scale, s.offset)
            for s in self.strata
        )
        return ItemScores(tuple(seeds), strata, self.weight)


def check_same_items(arms: Sequence[ItemScores]) -> None:
    """Paired resampling needs every arm scored on the same strata with the same number of items."""
    shape = [(s.label, s.items) for s in arms[0].strata]
    for a in arms[1:]:
        if [(s.label, s.items) for s in a.strata] != shape:
            raise ValueError("arms were scored on different items; they cannot be resampled in pairs")


def replicates(arms: Sequence[ItemScores], resamples: int = RESAMPLES, seed: int = SEED) -> list[np.ndarray]:
    """Per arm, (B, S, K) stratum values under B paired item resamples (the same item weights
    for every arm and seed). Work is one (chunk x I) @ (I x S) product per stratum and arm."""
    check_same_items(arms)
    rng = np.random.default_rng(seed)
    out = [np.empty((resamples, len(a.seeds), len(a.strata))) for a in arms]
    for k, stratum in enumerate(arms[0].strata):
        n = stratum.items
        chunk = max(1, CHUNK_WEIGHTS // n)
        for lo in range(0, resamples, chunk):
            b = min(chunk, resamples - lo)
            w = POISSON[np.frombuffer(rng.bytes(2 * b * n), dtype=np.uint16).reshape(b, n)]
            for a, rep in zip(arms, out, strict=True):
                st = a.strata[k]
                num = w @ st.num.T.astype(np.float32)  # (b, S)
                den = w @ st.den.T.astype(np.float32)  # (b,) or (b, S)
                den = den[:, None] if den.ndim == 1 else den
                with np.errstate(invalid="ignore", divide="ignore"):
                    ratio = np.where(den > 0, num / den, np.nan)  # a draw with no items: dropped below
                rep[lo : lo + b, :, k] = st.offset + st.scale * ratio
    return out


@dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval and how it was made."""

    estimate: float
    low: float | None
    high: float | None
    se: float | None
    df: float | None
    seed_var: float | None  # the seed part of se^2 (None: unknown, fewer than 2 seeds)
    item_var: float | None  # the item part of se^2 (None: no per-item data)
    seeds: tuple[int, ...]  # seeds per arm: (S,) for one arm, (S_a, S_b) for a difference
    paired: bool
    method: str  # "seeds+items", "seeds", "items" or "none" (no noise measured: no interval)
    clipped: bool = False
    clipped_side: str | None = None  # "low", "high" or "both": where the metric's range cut it
    level: float = LEVEL  # 0.95; per-group intervals are wider (Bonferroni)

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2

    @property
    def weak(self) -> bool:
        return min(self.seeds) < WEAK_BELOW

    @property
    def excludes_zero(self) -> bool | None:
        return None if self.low is None else not (self.low <= 0.0 <= self.high)

    @classmethod
    def from_json(cls, d: Any) -> Interval:
        """An `as_dict()` back (its derived keys dropped); an Interval passes through."""
        if isinstance(d, Interval):
            return d
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**{**keep, "seeds": tuple(keep["seeds"])})

    def as_dict(self) -> dict:
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "se": self.se,
            "df": self.df,
            "seed_var": self.seed_var,
            "item_var": self.item_var,
            "seeds": list(self.seeds),
            "paired": self.paired,
            "method": self.method,
            "clipped": self.clipped,
            "clipped_side": self.clipped_side,
            "level": self.level,
            "weak": self.weak,
            "half_width": self.half_width,
        }


def _var(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(np.var(x, ddof=1)) if len(x) > 1 else 0.0


@dataclass(frozen=True)
class Component:
    """One estimated variance term and the variance of that estimate (for Satterthwaite)."""

    var: float
    var_of_var: float
    df: float = math.inf  # its degrees of freedom


@dataclass(frozen=True)
class ItemParts:
    """Per-arm item-level variance pieces, from the bootstrap (see `item_parts`)."""

    shared: Component  # sb^2 / I: the item effect common to every seed
    interaction: list[float]  # per arm: se^2 / (S I), already inside that arm's seed part


def _mean_each(reps: np.ndarray) -> tuple[float, float]:
    """(V_mean, mean_s V_s) of (B, S) bootstrap values."""
    return _var(reps.mean(1)), float(np.mean([_var(reps[:, s]) for s in range(reps.shape[1])]))


def item_parts(reps: Sequence[np.ndarray], items: Sequence[int], signs: Sequence[int] = (1,)) -> ItemParts:
    """The item-level pieces of sum_j sign_j * (arm j's mean over seeds), summed over strata.

    `reps[j]` is arm j's (B, S_j, K) bootstrap values (item draws shared by the arms), `items`
    the K strata's item counts. Per stratum, A = the bootstrap variance of the combination and
    C_j = (V_each - V_mean) / (S_j - 1) = arm j's seed-by-item interaction se^2/(S_j I), so
    sb^2/I = A - sum_j C_j. In ANOVA terms A = MS_items / (S I) and C_j = MS_residual / (S I),
    so the estimate's variance is 2 (A^2 / (I-1) + sum_j C_j^2 / ((S_j-1)(I-1))).
    A paired difference is passed as one arm (the per-seed differences).
    """
    shared, var_of = 0.0, 0.0
    inter = [0.0] * len(reps)
    for k, n in enumerate(items):
        combo = sum(sg * r[:, :, k].mean(1) for sg, r in zip(signs, reps, strict=True))
        a = _var(combo)
        shared += a
        var_of += 2 * a * a / max(n - 1, 1)
        for j, r in enumerate(reps):
            s = r.shape[1]
            if s >= 2:
                v_mean, v_each = _mean_each(r[:, :, k])
                c = max(0.0, (v_each - v_mean) / (s - 1))
                inter[j] += c
                shared -= c
                var_of += 2 * c * c / ((s - 1) * max(n - 1, 1))
    return ItemParts(Component(max(0.0, shared), var_of), inter)


def seed_component(values: np.ndarray) -> Component | None:
    """var(values) / S, a chi-square estimate with S - 1 df (None with fewer than 2 seeds).
    Each per-seed value averages the same items, so it holds sa^2/S + se^2/(S I)."""
    s = len(values)
    if s < 2:
        return None
    v = _var(values) / s
    return Component(v, 2 * v * v / (s - 1), s - 1)


def _welch(parts: list[Component]) -> Component:
    """The seed parts of two arms as one term, with Welch's degrees of freedom."""
    v = sum(c.var for c in parts)
    denom = sum(c.var * c.var / c.df for c in parts if c.df > 0)
    return Component(v, sum(c.var_of_var for c in parts), v * v / denom if denom > 0 else math.inf)


def _finish(
    estimate: float,
    seed: Component | None,
    item: Component | None,
    seeds: tuple[int, ...],
    paired: bool,
    bounds: tuple[float, float],
    level: float = LEVEL,
) -> Interval:
    """Combine the parts, each at its own quantile, as a p-norm (`combine_p`); clip to `bounds`.

    half = ((t_{df_seed} sqrt(seed))^p + (z sqrt(item))^p)^(1/p): the seed part's t quantile
    (S - 1 df, or Welch's) where that part is all there is, the normal's where the items are
    (hundreds of them). It is never narrower than a t interval on either part alone; a single
    Welch-Satterthwaite df instead trusts a 1-2 df seed variance too much (90% with 2 seeds).
    """
    method = {(True, True): "seeds+items", (True, False): "seeds", (False, True): "items"}.get(
        (seed is not None, item is not None), "none"
    )
    if method == "none":
        return Interval(estimate, None, None, None, None, None, None, seeds, paired, method)
    seed_var = seed.var if seed else 0.0
    item_var = item.var if item else 0.0
    q = 1 - (1 - level) / 2
    t = t_quantile(q, seed.df) if seed else 0.0
    p = combine_p(seed.df if seed else None)
    h_seed, h_item = t * math.sqrt(seed_var), t_quantile(q, None) * math.sqrt(item_var)
    top = max(h_seed, h_item)
    half = top * ((h_seed / top) ** p + (h_item / top) ** p) ** (1 / p) if top > 0 else 0.0
    if half <= 1e-12 * max(1.0, abs(estimate)):
        # no noise measured at all (seeds identical in effect, no per-item data): an interval of
        # zero width would turn any difference into a verdict
        return Interval(estimate, None, None, None, None, None, None, seeds, paired, "none")
    low, high = estimate - half, estimate + half
    side = {(True, False): "low", (False, True): "high", (True, True): "both"}.get(
        (low < bounds[0], high > bounds[1])
    )
    low, high = max(low, bounds[0]), min(high, bounds[1])
    return Interval(
        estimate,
        low,
        high,
        math.sqrt(seed_var + item_var),
        None if seed is None or math.isinf(seed.df) else seed.df,
        seed.var if seed else None,
        item.var if item else None,
        seeds,
        paired,
        method,
        side is not None,
        side,
        level,
    )


def arm_interval(
    values: np.ndarray,
    reps: np.ndarray | None = None,
    items: Sequence[int] = (),
    bounds: tuple[float, float] = (-math.inf, math.inf),
    level: float = LEVEL,
) -> Interval:
    """One arm's mean over seeds. `values` (S,) per seed; `reps` (B, S, K) its item resamples
    (already weighted so that they sum over K to the metric) or None."""
    values = np.asarray(values, dtype=np.float64)
    parts = None if reps is None else item_parts([reps], items)
    seed = seed_component(values)
    return _finish(float(values.mean()), seed, parts.shared if parts else None, (len(values),), False, bounds, level)


def replicate_seeds(arm: ItemScores) -> list[list[int]]:
    """Groups of seeds whose per-item results are identical in every stratum: the same run again
    (an engine that ignores the seed, a copied run dir), not independent samples. Their seed
    spread of 0 would pass for a noiseless experiment, and an interval from them covers the truth
    about half the time (`tests/test_report_intervals.py`); compare refuses them by name. Per-item
    data, not per-seed values, decide: two seeds of a 0/1 metric can tie by chance."""
    groups: dict[bytes, list[int]] = {}
    for row, seed in enumerate(arm.seeds):
        key = b"".join(np.ascontiguousarray(s.num[row]).tobytes() for s in arm.strata)
        groups.setdefault(key, []).append(seed)
    return [g for g in groups.values() if len(g) > 1]


def difference_interval(
    a: dict[int, float],
    b: dict[int, float],
    reps_a: np.ndarray | None = None,
    reps_b: np.ndarray | None = None,
    items: Sequence[int] = (),
    bounds: tuple[float, float] = (-math.inf, math.inf),
    level: float = LEVEL,
) -> Interval:
    """mean(a) - mean(b) from per-seed values {seed: value}; `reps_*` (B, S, K) item resamples
    with seeds in sorted order (item draws shared by the arms), or None when an arm has none.
    Paired by seed when both arms ran the same >= 2 seeds, else Welch."""
    sa, sb = sorted(a), sorted(b)
    va, vb = np.array([a[s] for s in sa]), np.array([b[s] for s in sb])
    have_items = reps_a is not None and reps_b is not None
    seeds = (len(sa), len(sb))
    if sa == sb and len(sa) >= 2:
        d = va - vb
        parts = item_parts([reps_a - reps_b], items) if have_items else None
        seed = seed_component(d)
        return _finish(float(d.mean()), seed, parts.shared if parts else None, seeds, True, bounds, level)
    parts = item_parts([reps_a, reps_b], items, signs=(1, -1)) if have_items else None
    comps = [seed_component(va), seed_component(vb)]
    seed = None if None in comps else _welch(comps)
    est = float(va.mean() - vb.mean())
    return _finish(est, seed, parts.shared if parts else None, seeds, False, bounds, level)


def at_level(iv: Interval, level: float) -> Interval:
    """The same estimate and noise parts at another level, unclipped (the sequential stopping rule
    of `armlab.decide` looks at 1 - 0.05 / looks)."""
    if iv.low is None or iv.high is None:
        return iv
    seed = None if iv.seed_var is None else Component(iv.seed_var, 0.0, math.inf if iv.df is None else iv.df)
    item = None if iv.item_var is None else Component(iv.item_var, 0.0)
    return _finish(iv.estimate, seed, item, iv.seeds, iv.paired, (-math.inf, math.inf), level)
