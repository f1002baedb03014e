"""Selection policies: pure, vectorised functions of (document key, score, weight) and a seed.

Every policy reduces to a threshold on a per-document 128-bit rank `(primary, secondary)`
(both uint64, compared lexicographically, larger is better):

- `top`:    primary = the score's order-preserving bits, secondary = ~mix(key, seed) (the
            deterministic tie-break: among equal scores, the smaller hash wins);
- `sample`: primary = bits of score / temperature + Gumbel(uniform(key, seed)), i.e. Gumbel
            top-k, which draws without replacement with probability proportional to
            exp(score / temperature) (QuRating's sampling);
- the `max_rows` / `max_tokens` cap: primary = ~mix(key, seed, CAP): a seeded uniform sample.

The threshold is found exactly by `rank_threshold`, a radix select over any number of chunks
(re-read from disk on each pass) with bounded memory, weighted by rows or by tokens. Given
the thresholds, membership (`members`) depends only on the seed, the key and the score: never
on the file layout, worker count or order of processing (DESIGN.md invariant 3).
`random` needs no threshold: uniform(key, seed) < ratio (a binomial number of rows).

A document without a score (NaN or null) is not rankable: it ranks below every scored document
(primary 0), in seeded uniform order among its kind. So a `top` / `sample` arm is the same share
of the pool as a `random` arm of the same ratio (comparable sizes), and takes unscored documents
only when its ratio exceeds the scored share (prepare says how many).

`arm_members` applies an arm (policy, threshold, cap) to one file's arrays; `Rules` carries the
thresholds to the worker processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from armlab.data.identity import mix, uniform
from armlab.spec import ArmSpec, EvalSpec, TokenizerSpec

# Salts keep the hashes of different uses independent for the same seed.
SALT_EVAL = 1
SALT_TOKENIZER = 2
SALT_RANDOM = 3
SALT_TIE = 4
SALT_GUMBEL = 5
SALT_CAP = 6
SALT_SHUFFLE = 7

CHARS_PER_TOKEN = 4.0  # token estimate when the pool has no token counts (recorded in manifests)
SIGN = np.uint64(1 << 63)
DIGIT_BITS = 16
COLLECT_LIMIT = 4_000_000  # candidates this few are finished with one exact in-memory sort

Chunk = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # primary, secondary, weight (None: 1 each)


def float_bits(x: np.ndarray) -> np.ndarray:
    """Order-preserving map float64 -> uint64 (a < b  <=>  bits(a) < bits(b)); NaN must be removed first."""
    b = (np.asarray(x, dtype=np.float64) + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    return np.where(b & SIGN, ~b, b | SIGN)


def _ranked(x: np.ndarray) -> np.ndarray:
    """float_bits, with NaN (no score) at 0: below every number, -inf included."""
    nan = np.isnan(x)
    if not nan.any():
        return float_bits(x)
    return np.where(nan, np.uint64(0), float_bits(np.where(nan, 0.0, x)))


def top_rank(scores: np.ndarray, keys: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return _ranked(scores), ~mix(keys, seed, SALT_TIE)


def sample_rank(
    scores: np.ndarray, keys: np.ndarray, seed: int, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    u = np.clip(uniform(keys, seed, SALT_GUMBEL), 1e-300, None)
    gumbel = -np.log(-np.log(u))
    return _ranked(scores / temperature + gumbel), ~mix(keys, seed, SALT_TIE)


def cap_rank(keys: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return ~mix(keys, seed, SALT_CAP), np.zeros(len(keys), dtype=np.uint64)


def random_members(keys: np.ndarray, seed: int, ratio: float) -> np.ndarray:
    return uniform(keys, seed, SALT_RANDOM) < ratio


@dataclass(frozen=True)
class Threshold:
    """Documents with (primary, secondary) >= (p, s) are selected; `None` threshold selects nothing."""

    p: int
    s: int

    def accepts(self, primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
        p, s = np.uint64(self.p), np.uint64(self.s)
        return (primary > p) | ((primary == p) & (secondary >= s))

    def to_json(self) -> list[str]:
        return [f"{self.p:016x}", f"{self.s:016x}"]


def rank_threshold(
    chunks: Callable[[], Iterable[Chunk]], target: float, collect_limit: int = COLLECT_LIMIT
) -> Threshold | None:
    """Exact threshold of the best documents whose total weight first reaches `target`.

    Radix select over the 128-bit rank, 16 bits a pass, most significant first: each pass
    histograms the next digit of the documents still tied with the prefix found so far, keeps the
    bin where the cumulative weight (from the top) crosses what is left of `target`, and once at
    most `collect_limit` documents remain tied, finishes with one exact sort. `chunks()` is
    called once per pass, so the documents can stream from disk. Returns None when target <= 0;
    when target exceeds the total weight, the threshold selects every document.
    """
    if target <= 0:
        return None
    fixed = 0  # leading bits of the 128-bit rank fixed so far
    prefix = 0  # their value
    remaining = float(target)
    while True:
        # Which documents share the prefix, and the histogram of their next digit.
        hist = np.zeros(1 << DIGIT_BITS, dtype=np.float64)
        tied = 0
        for primary, secondary, weight in chunks():
            m = _prefix_mask(primary, secondary, fixed, prefix)
            if m is not None:
                primary, secondary = primary[m], secondary[m]
                weight = weight[m] if weight is not None else None
            tied += len(primary)
            if fixed < 128:
                d = _digit(primary, secondary, fixed)
                hist += np.bincount(d, weights=weight, minlength=1 << DIGIT_BITS)
        if tied == 0:
            return None
        if tied <= collect_limit or fixed >= 128:
            return _exact(chunks, fixed, prefix, remaining)
        cum = np.cumsum(hist[::-1])  # weight at or above each bin, best bin first
        pos = int(np.searchsorted(cum, remaining - 1e-9))
        if pos >= len(cum):  # the target exceeds all the weight: take everything
            return Threshold(0, 0)
        remaining -= float(cum[pos - 1]) if pos else 0.0
        prefix = (prefix << DIGIT_BITS) | ((1 << DIGIT_BITS) - 1 - pos)
        fixed += DIGIT_BITS


def _prefix_mask(primary: np.ndarray, secondary: np.ndarray, fixed: int, prefix: int) -> np.ndarray | None:
    if fixed == 0:
        return None
    if fixed <= 64:
        return (
            (primary >> np.uint64(64 - fixed)) == np.uint64(prefix)
            if fixed < 64
            else primary == np.uint64(prefix)
        )
    p_hi = prefix >> (fixed - 64)
    s_fixed = fixed - 64
    s_prefix = prefix & ((1 << s_fixed) - 1)
    return (primary == np.uint64(p_hi)) & ((secondary >> np.uint64(64 - s_fixed)) == np.uint64(s_prefix))


def _digit(primary: np.ndarray, secondary: np.ndarray, fixed: int) -> np.ndarray:
    word, off = (primary, fixed) if fixed < 64 else (secondary, fixed - 64)
    return ((word >> np.uint64(64 - off - DIGIT_BITS)) & np.uint64((1 << DIGIT_BITS) - 1)).astype(np.intp)


def _exact(chunks: Callable[[], Iterable[Chunk]], fixed: int, prefix: int, remaining: float) -> Threshold:
    ps, ss, ws = [], [], []
    for primary, secondary, weight in chunks():
        m = _prefix_mask(primary, secondary, fixed, prefix)
        if m is not None:
            primary, secondary = primary[m], secondary[m]
            weight = weight[m] if weight is not None else None
        ps.append(primary)
        ss.append(secondary)
        ws.append(weight if weight is not None else np.ones(len(primary)))
    p, s, w = np.concatenate(ps), np.concatenate(ss), np.concatenate(ws).astype(np.float64)
    order = np.lexsort((s, p))[::-1]  # best first
    cum = np.cumsum(w[order])
    pos = int(np.searchsorted(cum, remaining - 1e-9))
    if pos >= len(cum):
        pos = len(cum) - 1  # not enough weight: take all of the tied documents
    best = order[pos]
    return Threshold(int(p[best]), int(s[best]))


# -- arm membership over per-document arrays ------------------------------------------------------
@dataclass
class Rules:
    """Everything membership depends on besides the per-document arrays (picklable, for workers)."""

    eval_spec: EvalSpec
    eval_cut: int
    tokenizer_spec: TokenizerSpec
    tokenizer_cut: Threshold | None  # holdout.tokenizer_rank: the staged tokenizer sample
    arms: dict[str, ArmSpec]
    thresholds: dict[str, Threshold | None] = field(default_factory=dict)
    caps: dict[str, Threshold | None] = field(default_factory=dict)


def weights(a: dict[str, np.ndarray], by_tokens: bool) -> np.ndarray | None:
    """Per-document weight for `by = "tokens"`: the token counts, else chars / CHARS_PER_TOKEN."""
    if not by_tokens:
        return None
    if "tokens" in a:
        return a["tokens"].astype(np.float64)
    return a["chars"] / CHARS_PER_TOKEN


def cap_threshold(arm: ArmSpec, members: Callable[[], Iterable[dict[str, np.ndarray]]]) -> Threshold | None:
    """`max_rows` / `max_tokens`: the threshold of a seeded uniform sample of the arm (the
    stricter of the two when both are set). `members()` yields, file by file, the arm's documents
    as arrays: `keys`, and `tokens` or `chars` for the token weights."""
    caps: list[Threshold] = []
    for limit, by_tokens in ((arm.max_rows, False), (arm.max_tokens, True)):
        if not limit:
            continue

        def chunks(by_tokens: bool = by_tokens) -> Iterable[Chunk]:
            for a in members():
                p, s = cap_rank(a["keys"], arm.seed)
                yield p, s, weights(a, by_tokens)

        th = rank_threshold(chunks, float(limit))
        if th is not None:
            caps.append(th)
    return max(caps, key=lambda t: (t.p, t.s)) if caps else None


def score_key(arm: ArmSpec) -> str:
    """The key-pass array an arm ranks by: a pool column's scores, or a scorer's (its sidecar)."""
    return f"scorer:{arm.score}" if arm.score else f"score:{arm.score_column}"


def score_label(arm: ArmSpec) -> str:
    """How messages name an arm's score."""
    return f"scorer {arm.score!r}" if arm.score else f"score column {arm.score_column!r}"


def arm_base(
    arm: ArmSpec, a: dict[str, np.ndarray], held: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | np.ndarray:
    """Random arms: their member mask. Top/sample arms: (candidate mask, primary, secondary) ranks."""
    keys = a["keys"]
    if arm.kind == "random":
        return random_members(keys, arm.seed, arm.ratio) & ~held
    score = a[score_key(arm)]
    cand = ~held  # unscored documents too: they rank last
    if arm.kind == "top":
        p, s = top_rank(score[cand], keys[cand], arm.seed)
    else:
        p, s = sample_rank(score[cand], keys[cand], arm.seed, arm.temperature)
    return cand, p, s


def arm_members(
    arm: ArmSpec, rules: Rules, a: dict[str, np.ndarray], held: np.ndarray, capped: bool = True
) -> np.ndarray:
    base = arm_base(arm, a, held)
    if isinstance(base, tuple):
        cand, p, s = base
        m = np.zeros(len(cand), dtype=bool)
        th = rules.thresholds[arm.name]
        if th is not None:
            m[cand] = th.accepts(p, s)
    else:
        m = base
    cap = rules.caps.get(arm.name)  # max_rows / max_tokens: a seeded uniform subsample
    if capped and cap is not None:
        p, s = cap_rank(a["keys"], arm.seed)
        m &= cap.accepts(p, s)
    return m
