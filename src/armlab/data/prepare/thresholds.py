"""Thresholds (in the parent, bounded memory) and the membership they define.

From the key pass's .npz files: the eval cut, the tokenizer fraction, each `top` / `sample` arm's
exact global threshold and each `max_rows` / `max_tokens` cap, by radix select
(`select.rank_threshold`), re-reading one file's arrays at a time. Given those `Rules`,
membership (`masks`) is a pure function of one file's arrays: the text pass recomputes it per
file in the workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armlab.data import holdout
from armlab.data.prepare.keys import load_keys
from armlab.data.prepare.targets import EVAL, TOKENIZER
from armlab.data.select import (
    CHARS_PER_TOKEN,
    Chunk,
    Rules,
    Threshold,
    arm_base,
    arm_members,
    cap_threshold,
    rank_threshold,
    score_key,
    score_label,
    weights,
)
from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.spec import ArmSpec, Experiment

TOKENIZER_MARGIN = 1.5  # estimated document lengths: stage this much more, cut exactly when writing


@dataclass(frozen=True)
class PoolSummary:
    """What the thresholds learned about the readable pool files (by unit index)."""

    rows: int
    text_bytes: dict[int, int]
    file_rows: dict[int, int]
    tokenizer_exact: bool  # the tokenizer cut came from exact document lengths


def masks(rules: Rules, a: dict[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Each named target's member mask over one file's arrays `a`."""
    held = holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == EVAL:
            out[name] = held
        elif name == TOKENIZER:
            out[name] = holdout.tokenizer_mask(a["keys"], rules.tokenizer_spec, rules.tokenizer_cut, held)
        else:
            out[name] = arm_members(rules.arms[name], rules, a, held)
    return out


def compute_rules(
    exp: Experiment, arms: list[ArmSpec], live: list[int], npz: dict[int, Path]
) -> tuple[Rules, PoolSummary]:
    """Eval cut, tokenizer fraction, arm thresholds and caps: all exact, memory bounded by one file."""
    rows = 0
    small = np.zeros(0, dtype=np.uint64)  # the docs smallest eval hashes so far (bounded memory)
    text_bytes: dict[int, int] = {}
    file_rows: dict[int, int] = {}
    all_empty = True  # known only when the key pass read the text (its chars)
    for i in live:
        a = load_keys(npz[i])
        all_empty &= "chars" in a and not a["chars"].any()
        rows += len(a["keys"])
        file_rows[i] = len(a["keys"])
        small = holdout.smallest(
            np.concatenate([small, holdout.eval_hashes(a["keys"], exp.eval)]), exp.eval.docs
        )
        text_bytes[i] = int(a["text_bytes"])
    if rows == 0:
        raise ArmlabError(f"pool {exp.pool.uri!r}: no documents in {len(live)} readable file(s)")
    if all_empty:
        raise ArmlabError(
            f"pool {exp.pool.uri!r}: all {rows:,} texts in column {exp.pool.text_column!r} are null or empty; "
            "check pool.text_column (or the export that wrote the pool)"
        )
    cut = holdout.eval_cut(small, exp.eval, rows, exp.pool.uri)
    rules = Rules(exp.eval, cut, exp.tokenizer, None, {a.name: a for a in arms})
    rules.tokenizer_cut, exact = _tokenizer_cut(rules, live, npz)

    unscored: dict[str, tuple[int, int]] = {}  # arm -> (unscored, non-eval) documents
    for arm in arms:
        if arm.kind in ("top", "sample"):
            nan, n = _arm_threshold(arm, rules, live, npz)
            if nan:
                unscored[arm.name] = (nan, n)
    for arm in arms:
        if arm.max_rows or arm.max_tokens:
            rules.caps[arm.name] = _arm_cap(arm, rules, live, npz)
    for name, (nan, n) in unscored.items():
        _warn_unscored(rules.arms[name], rules, live, npz, nan, n)
    return rules, PoolSummary(rows, text_bytes, file_rows, exact)


def _arm_threshold(arm: ArmSpec, rules: Rules, live: list[int], npz: dict[int, Path]) -> tuple[int, int]:
    """A `top` / `sample` arm's exact threshold (into `rules`): `ratio` of the non-eval pool's
    weight, unscored documents included (they rank last). Returns (unscored, non-eval) docs."""
    by_tokens = arm.by == "tokens"
    total_w, lo, hi, nan, n = 0.0, np.inf, -np.inf, 0, 0
    for i in live:
        a = load_keys(npz[i])
        cand = ~holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
        sc = a[score_key(arm)]
        scored = cand & ~np.isnan(sc)
        w = weights(a, by_tokens)
        total_w += float(cand.sum() if w is None else w[cand].sum())
        n, nan = n + int(cand.sum()), nan + int((cand & ~scored).sum())
        if scored.any():
            lo, hi = min(lo, float(sc[scored].min())), max(hi, float(sc[scored].max()))
    if n and nan == n:
        raise ArmlabError(
            f"arm {arm.name!r}: {score_label(arm)} is NaN or null for every document; "
            "check the column (or its scoring job)"
        )
    if arm.kind == "top" and lo == hi:
        raise ArmlabError(
            f"arm {arm.name!r}: {score_label(arm)} is {lo} for every document, so 'top' would be "
            "chosen by the tie-break hash alone; check the column, or use kind = 'random'"
        )

    def chunks() -> Iterable[Chunk]:
        for i in live:
            a = load_keys(npz[i])
            cand, p, s = arm_base(arm, a, holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut))
            w = weights(a, by_tokens)
            yield p, s, (w[cand] if w is not None else None)

    target = round(arm.ratio * total_w) if arm.by == "rows" else arm.ratio * total_w
    rules.thresholds[arm.name] = rank_threshold(chunks, target)
    return nan, n


def _arm_cap(arm: ArmSpec, rules: Rules, live: list[int], npz: dict[int, Path]) -> Threshold | None:
    """`max_rows` / `max_tokens`: the cap's threshold over the arm's uncapped members."""

    def members() -> Iterable[dict[str, np.ndarray]]:
        for i in live:
            a = load_keys(npz[i])
            held = holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
            m = arm_members(arm, rules, a, held, capped=False)
            yield {k: a[k][m] for k in ("keys", "tokens", "chars") if k in a}

    return cap_threshold(arm, members)


def capped_chars(a: dict[str, np.ndarray], doc_cap: int) -> np.ndarray:
    """Each document's chars as the tokenizer reads them (capped at doc_cap): exact where the key
    pass read the text, else from its token count, else its row group's mean document length."""
    if "chars" in a:
        return np.minimum(a["chars"], doc_cap).astype(np.float64)
    if "tokens" in a:
        return np.minimum(a["tokens"] * CHARS_PER_TOKEN, doc_cap)
    return np.minimum(a["chars_est"], doc_cap)


def _tokenizer_cut(rules: Rules, live: list[int], npz: dict[int, Path]) -> tuple[Threshold | None, bool]:
    """The tokenizer sample's threshold (holdout.py), and whether the capped lengths were exact
    (else the sample is staged with TOKENIZER_MARGIN and cut exactly when written)."""
    spec = rules.tokenizer_spec
    exact = all(_has_chars(npz[i]) for i in live)

    def chunks() -> Iterable[Chunk]:
        for i in live:
            a = load_keys(npz[i])
            keep = ~holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
            p, s = holdout.tokenizer_rank(a["keys"][keep], spec)
            yield p, s, capped_chars(a, spec.doc_cap)[keep]

    return rank_threshold(chunks, spec.train_chars * (1 if exact else TOKENIZER_MARGIN)), exact


def _has_chars(path: Path) -> bool:
    with np.load(path) as z:
        return "chars" in z.files


def _warn_unscored(
    arm: ArmSpec, rules: Rules, live: list[int], npz: dict[int, Path], nan: int, n: int
) -> None:
    """Unscored documents rank last (select.py): say how many there are and how many the arm took."""
    taken = 0
    for i in live:
        a = load_keys(npz[i])
        m = arm_members(arm, rules, a, holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut))
        taken += int((m & np.isnan(a[score_key(arm)])).sum())
    what = f"{arm.score_column!r} score" if arm.score_column else f"score from scorer {arm.score!r}"
    console.print(
        f"[yellow]warning:[/] arm {arm.name!r}: {nan:,} of {n:,} non-eval documents have no {what} (NaN or null); they rank below every scored one, so the arm is still {arm.ratio:g} of the pool "
        f"({arm.by}), and it took {taken:,} of them",
        soft_wrap=True,
    )


def count_members(rules: Rules, live: list[int], npz: dict[int, Path], names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for i in live:
        for name, m in masks(rules, load_keys(npz[i]), names).items():
            counts[name] += int(m.sum())
    return counts
