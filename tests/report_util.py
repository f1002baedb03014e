"""Synthetic experiments with known true differences, for checking the report's intervals.

Each simulated experiment draws a fresh eval set from an item population and fresh training seeds,
so an interval that claims 95% must cover the population difference in ~95% of experiments.

CORE-like: K tasks of I binary items, chance `baseline` percent. Item i of task k has arm-B
accuracy p_i ~ U(0.3, 0.7) and arm-A accuracy p_i + delta + u_i (u_i ~ N(0, item_sd): arms differ
item by item, the shared item effect). A seed's model is better or worse everywhere by a_s
(seed_sd; correlated between the arms' same seed by `seed_corr`, which is what pairing removes).
Outcomes are Bernoulli, so a seed's model also differs item by item (the interaction).
The true CORE difference is delta / (1 - baseline/100): centring is linear.

bpb-like: D documents of L_d ~ lognormal bytes; nats per byte r_d ~ U(0.8, 1.2) + arm effect +
per-document arm effect u_d + seed effect a_s + per-(seed, doc) noise e. The true bpb difference
is (delta_a - delta_b) / ln 2.
"""

from __future__ import annotations

import math

import numpy as np

from armlab.report.intervals import ItemScores, Stratum


def core_experiment(
    rng: np.random.Generator,
    seeds_a: int = 3,
    seeds_b: int = 3,
    tasks: int = 4,
    items: int = 100,
    delta: float = 0.03,
    item_sd: float = 0.05,
    seed_sd: float = 0.02,
    seed_corr: float = 0.5,
    baseline: float = 25.0,
) -> tuple[ItemScores, ItemScores, float]:
    """(arm A, arm B, true difference of A - B) with seeds 0.. per arm (paired when equal)."""
    n = max(seeds_a, seeds_b)
    shared = rng.normal(0.0, seed_sd * math.sqrt(seed_corr), n)
    own = lambda: rng.normal(0.0, seed_sd * math.sqrt(1 - seed_corr), n)  # noqa: E731
    a_seed, b_seed = (shared + own())[:seeds_a], (shared + own())[:seeds_b]
    strata_a, strata_b = [], []
    b = baseline / 100
    for k in range(tasks):
        p = rng.uniform(0.3, 0.7, items)
        pa = p + delta + rng.normal(0.0, item_sd, items)
        ca = rng.random((seeds_a, items)) < np.clip(pa[None] + a_seed[:, None], 0, 1)
        cb = rng.random((seeds_b, items)) < np.clip(p[None] + b_seed[:, None], 0, 1)
        ones = np.ones(items)
        strata_a.append(Stratum(f"t{k}", ca.astype(np.float64), ones, 1 / (1 - b), -b / (1 - b)))
        strata_b.append(Stratum(f"t{k}", cb.astype(np.float64), ones, 1 / (1 - b), -b / (1 - b)))
    arm = lambda s, n: ItemScores(tuple(range(n)), tuple(s), 1 / tasks)  # noqa: E731
    return arm(strata_a, seeds_a), arm(strata_b, seeds_b), delta / (1 - b)


def bpb_experiment(
    rng: np.random.Generator,
    seeds: int = 3,
    docs: int = 400,
    delta: float = -0.02,
    doc_sd: float = 0.05,
    seed_sd: float = 0.01,
    noise_sd: float = 0.05,
) -> tuple[ItemScores, ItemScores, float]:
    """(arm A, arm B, true bpb difference of A - B), paired seeds 0..seeds-1."""
    length = rng.lognormal(6.0, 0.8, docs)
    r = rng.uniform(0.8, 1.2, docs)
    u = rng.normal(0.0, doc_sd, docs)
    shared = rng.normal(0.0, seed_sd / math.sqrt(2), seeds)

    def arm(effect: float, per_doc: np.ndarray) -> ItemScores:
        a = shared + rng.normal(0.0, seed_sd / math.sqrt(2), seeds)
        per_byte = r[None] + effect + per_doc[None] + a[:, None] + rng.normal(0.0, noise_sd, (seeds, docs))
        nats = per_byte * length[None]
        return ItemScores(tuple(range(seeds)), (Stratum("eval", nats, length, 1 / math.log(2)),))

    return arm(delta, u), arm(0.0, np.zeros(docs)), delta / math.log(2)


def per_seed(arm: ItemScores) -> dict[int, float]:
    """{seed: metric} of a simulated arm."""
    return dict(zip(arm.seeds, arm.values().tolist(), strict=True))


def make_summary(
    curves: dict[str, dict[str, list[tuple[float, float]]]] | None = None,
    data: dict | None = None,
    train_eval_tokens: int = 8192,
    val_bpb_tokens: int | None = 50_000,
):
    """A report summary with just enough in it for the figures (two arms, top and random)."""
    from armlab.report.summary import ArmResult, EvalCoverage, RunResult, Summary

    curves = curves or {}
    arms = {}
    for arm in ("top", "random"):
        runs = [RunResult(run=f"{arm}-s{s}", seed=s, val_bpb=1.0, core=None, tokens=100, epoch=None,
                          train_time_s=None, step=10) for s in (0, 1)]  # fmt: skip
        arms[arm] = ArmResult(
            kind=arm, runs=runs, planned_seeds=[0, 1], curves=curves.get(arm, {}), val_bpb=None, core=None,
            eval=EvalCoverage(val_bpb_tokens=val_bpb_tokens),
        )  # fmt: skip
    return Summary(
        experiment="tiny", fingerprint="f" * 16, created=0.0, reference_arm="random", arms=arms, comparisons=[],
        verdict=[], warnings=[], bundle=None, resamples=10, bootstrap_seed=0, train_eval_tokens=train_eval_tokens,
        excluded=[], data=data,
    )  # fmt: skip


def off_model_bpb_experiment(
    rng: np.random.Generator,
    seeds: int = 3,
    docs: int = 300,
    junk_share: float = 0.3,
    effect_good: float = -0.03,
    effect_junk: float = 0.05,
    doc_sd: float = 0.04,
    seed_sd: float = 0.01,
    noise_sd: float = 0.04,
    heavy: bool = False,
    interaction_sd: float = 0.0,
    replicate: bool = False,
) -> tuple[ItemScores, ItemScores, float]:
    """bpb-like, off the intervals' model (normal, one population of documents, seeds alike on
    every document):

    - bimodal: two document types, good (lognormal(6.5, 0.8) bytes, 0.8-1.2 nats a byte) and junk
      (lognormal(5, 0.5) bytes, 2-3 nats a byte), on which the arm's effect differs (good
      `effect_good`, junk `effect_junk`), so per-document differences are a two-humped mixture;
    - `heavy`: per-document effects and per-(seed, document) noise from Student's t with 2.5 df
      (infinite kurtosis), seed effects from t with 3 df, and document lengths lognormal with
      sigma 1.5 (a few documents hold much of the bytes);
    - `interaction_sd`: each seed's model is better on one document type and worse on the other
      (an independent effect per arm, seed and type);
    - `replicate`: every seed of an arm is the same run (seed 0's) repeated.

    The true difference is the population's: E[bytes x effect] / E[bytes] / ln 2 over the mixture
    (the per-document, per-seed and interaction effects have mean 0)."""
    junk = rng.random(docs) < junk_share
    mu, sig = np.where(junk, 5.0, 6.5), np.where(junk, 0.5, 0.8) * (1.5 / 0.8 if heavy else 1.0)
    length = rng.lognormal(mu, sig)
    r = np.where(junk, rng.uniform(2.0, 3.0, docs), rng.uniform(0.8, 1.2, docs))

    def draw(df: float, sd: float, size) -> np.ndarray:
        if not heavy:
            return rng.normal(0.0, sd, size)
        return sd * rng.standard_t(df, size) / math.sqrt(df / (df - 2))  # the same variance

    u = np.where(junk, effect_junk, effect_good) + draw(2.5, doc_sd, docs)
    shared = draw(3.0, seed_sd / math.sqrt(2), seeds)

    def arm(per_doc: np.ndarray) -> ItemScores:
        a = shared + draw(3.0, seed_sd / math.sqrt(2), seeds)
        by_type = rng.normal(0.0, interaction_sd, (seeds, 2))  # (seed, [good, junk])
        inter = np.where(junk[None], by_type[:, 1:2], by_type[:, 0:1])
        per_byte = r[None] + per_doc[None] + a[:, None] + inter + draw(2.5, noise_sd, (seeds, docs))
        if replicate:
            per_byte = np.repeat(per_byte[:1], seeds, axis=0)
        nats = per_byte * length[None]
        return ItemScores(tuple(range(seeds)), (Stratum("eval", nats, length, 1 / math.log(2)),))

    s_g, s_j = (0.8 * 1.5 / 0.8, 0.5 * 1.5 / 0.8) if heavy else (0.8, 0.5)
    m_g, m_j = math.exp(6.5 + s_g**2 / 2), math.exp(5.0 + s_j**2 / 2)
    w_g, w_j = (1 - junk_share) * m_g, junk_share * m_j
    true = (w_g * effect_good + w_j * effect_junk) / (w_g + w_j) / math.log(2)
    return arm(u), arm(np.zeros(docs)), true
