"""Thresholds (in the parent, bounded memory) and the membership they define.

From the key pass's .npz files: the eval cut, the tokenizer fraction, each `top` / `sample` arm's
exact global threshold and each `max_rows` / `max_tokens` cap, by radix select
(`select.rank_threshold`), re-reading one file's arrays at a time. Given those `Rules`,
membership (`masks`) is a pure function of one file's arrays: the text pass recomputes it per
file in the workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from armlab.data import holdout
from armlab.data.prepare.keys import load_keys
from armlab.data.prepare.targets import EVAL, TOKENIZER
from armlab.data.select import Chunk, Rules, arm_base, arm_members, cap_threshold, rank_threshold, weights
from armlab.errors import ArmlabError
from armlab.spec import ArmSpec, Experiment


@dataclass(frozen=True)
class PoolSummary:
    """What the thresholds learned about the readable pool files (by unit index)."""

    rows: int
    text_bytes: dict[int, int]
    file_rows: dict[int, int]


def masks(rules: Rules, a: dict[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
    """Each named target's member mask over one file's arrays `a`."""
    held = holdout.eval_mask(a["keys"], rules.eval_spec, rules.eval_cut)
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == EVAL:
            out[name] = held
        elif name == TOKENIZER:
            out[name] = holdout.tokenizer_mask(
                a["keys"], rules.tokenizer_spec, rules.tokenizer_fraction, held
            )
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
    for i in live:
        a = load_keys(npz[i])
        rows += len(a["keys"])
        file_rows[i] = len(a["keys"])
        small = holdout.smallest(
            np.concatenate([small, holdout.eval_hashes(a["keys"], exp.eval)]), exp.eval.docs
        )
        text_bytes[i] = int(a["text_bytes"])
    if rows == 0:
        raise ArmlabError(f"pool {exp.pool.uri!r}: no documents in {len(live)} readable file(s)")
    cut = holdout.eval_cut(small, exp.eval, rows, exp.pool.uri)
    held_rows = 0
    for i in live:
        held_rows += int(holdout.eval_mask(load_keys(npz[i])["keys"], exp.eval, cut).sum())
    total = sum(text_bytes.values())
    frac = holdout.tokenizer_fraction(exp.tokenizer, total * (1 - held_rows / rows))
    rules = Rules(exp.eval, cut, exp.tokenizer, frac, {a.name: a for a in arms})

    def chunks(arm: ArmSpec, by_tokens: bool) -> Callable[[], Iterable[Chunk]]:
        def gen() -> Iterable[Chunk]:
            for i in live:
                a = load_keys(npz[i])
                held = holdout.eval_mask(a["keys"], exp.eval, cut)
                cand, p, s = arm_base(arm, a, held)
                w = weights(a, by_tokens)
                yield p, s, (w[cand] if w is not None else None)

        return gen

    for arm in arms:
        if arm.kind not in ("top", "sample"):
            continue
        total_w, lo, hi = 0.0, np.inf, -np.inf
        for i in live:
            a = load_keys(npz[i])
            held = holdout.eval_mask(a["keys"], exp.eval, cut)
            sc = a[f"score:{arm.score_column}"]
            cand = ~held & ~np.isnan(sc)
            w = weights(a, arm.by == "tokens")
            total_w += float(cand.sum() if w is None else w[cand].sum())
            if cand.any():
                lo, hi = min(lo, float(sc[cand].min())), max(hi, float(sc[cand].max()))
        if arm.kind == "top" and lo == hi:
            raise ArmlabError(
                f"arm {arm.name!r}: score column {arm.score_column!r} is {lo} for every document, so 'top' would be "
                "chosen by the tie-break hash alone; check the column, or use kind = 'random'"
            )
        target = round(arm.ratio * total_w) if arm.by == "rows" else arm.ratio * total_w
        rules.thresholds[arm.name] = rank_threshold(chunks(arm, arm.by == "tokens"), target)

    for arm in arms:
        if arm.max_rows or arm.max_tokens:

            def members(arm: ArmSpec = arm) -> Iterable[dict[str, np.ndarray]]:
                for i in live:
                    a = load_keys(npz[i])
                    m = arm_members(arm, rules, a, holdout.eval_mask(a["keys"], exp.eval, cut), capped=False)
                    yield {k: a[k][m] for k in ("keys", "tokens", "chars") if k in a}

            rules.caps[arm.name] = cap_threshold(arm, members)
    return rules, PoolSummary(rows, text_bytes, file_rows)


def count_members(rules: Rules, live: list[int], npz: dict[int, Path], names: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for i in live:
        for name, m in masks(rules, load_keys(npz[i]), names).items():
            counts[name] += int(m.sum())
    return counts
