"""The built-in trainer's hyperparameters: nanochat 92d63d4's base_train defaults, in one place.

nanochat (karpathy/nanochat at 92d63d4, 2026-07-03) tunes every hyperparameter at depth 12
with 2**19 tokens per step and transfers them to other sizes (scripts/base_train.py):

- learning rates: embedding 0.3, unembedding 0.008, matrices (Muon) 0.02, scalars 0.5; all of
  them times sqrt(B / 2**19) for a total batch of B tokens (the AdamW ones also times
  1/sqrt(model_dim / 768) inside the optimiser's parameter groups, armlab.train.optim);
- Muon weight decay 0.28 x sqrt(B / 2**19) x D_ref / D, where D is the run's token horizon
  (ratio x scaling parameters) and D_ref that of d12 at the same ratio (the T_epoch rule,
  arXiv 2405.13698), decayed to zero over the run on a cosine;
- learning-rate schedule: 40 warmup steps, flat, then a linear warmdown over the last 65% of
  the steps to 5% of the peak (armlab.train.schedule).

The `[train]` fields of the experiment file override any of them; None there means "this
default". `resolve` turns a TrainSpec into the concrete values one run uses.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.spec import TrainSpec

NANOCHAT_COMMIT = "92d63d4"  # the nanochat commit this recipe follows (tests check it against that snapshot)

WINDOW_PATTERN = "SSSL"  # three short-window layers, then one full-context layer; the last is always full
EMBEDDING_LR = 0.3
UNEMBEDDING_LR = 0.008
MATRIX_LR = 0.02
SCALAR_LR = 0.5
WEIGHT_DECAY = 0.28
WARMUP_STEPS = 40
WARMDOWN_RATIO = 0.65
FINAL_LR_FRAC = 0.05


@dataclass(frozen=True)
class Hyperparameters:
    """The d12 / 2**19-token reference values of one run (before batch-size scaling)."""

    embedding_lr: float
    unembedding_lr: float
    matrix_lr: float
    scalar_lr: float
    weight_decay: float
    warmup_steps: int
    warmdown_ratio: float
    final_lr_frac: float


def _or(value, default):
    return default if value is None else value


def resolve(train: TrainSpec) -> Hyperparameters:
    """The experiment's values, with nanochat 92d63d4's default wherever the file says nothing."""
    return Hyperparameters(
        embedding_lr=_or(train.embedding_lr, EMBEDDING_LR),
        unembedding_lr=_or(train.unembedding_lr, UNEMBEDDING_LR),
        matrix_lr=_or(train.matrix_lr, MATRIX_LR),
        scalar_lr=_or(train.scalar_lr, SCALAR_LR),
        weight_decay=_or(train.weight_decay, WEIGHT_DECAY),
        warmup_steps=_or(train.warmup_steps, WARMUP_STEPS),
        warmdown_ratio=_or(train.warmdown_ratio, WARMDOWN_RATIO),
        final_lr_frac=_or(train.final_lr_frac, FINAL_LR_FRAC),
    )


def schedule_misfit(train: TrainSpec, num_iterations: int, defaults: bool = True) -> str | None:
    """One line when the learning-rate schedule does not fit the horizon (the warmup and the
    warmdown overlap: the rate never holds its peak, and the warmdown starts before the warmup
    ends), else None. `defaults`: unset keys take this recipe's values (the built-in engine); a
    nanochat checkout's own defaults are not known here, so only keys the file sets count.
    The fix names the keys: "lower" one the file sets, "set" one it leaves to the default."""
    warmup, ratio = train.warmup_steps, train.warmdown_ratio
    if defaults:
        warmup, ratio = _or(warmup, WARMUP_STEPS), _or(ratio, WARMDOWN_RATIO)
    if warmup is None or ratio is None:
        return None
    warmdown = round(ratio * num_iterations)
    if warmup + warmdown <= num_iterations:
        return None
    fits = [("warmup_steps", train.warmup_steps, num_iterations - warmdown, f"{num_iterations - warmdown}")]
    fits.append(("warmdown_ratio", train.warmdown_ratio, num_iterations - warmup, f"{(num_iterations - warmup) / num_iterations:.2f}"))
    how = " or ".join(
        f"{'lower' if now is not None else 'set'} train.{key}{f' ({now})' if now is not None else ''} to <= {text}"
        for key, now, room, text in fits
        if room > 0
    ) or "lower train.warmup_steps and train.warmdown_ratio (or train longer)"
    return (
        f"the learning-rate schedule does not fit {num_iterations} steps: warmup {warmup} + warmdown {warmdown} "
        f"({ratio:.0%} of the steps) = {warmup + warmdown} steps, so the warmdown starts before the warmup ends; {how}"
    )
