"""nanochat 92d63d4's schedules (scripts/base_train.py), as pure functions of the step, so a
resume needs no schedule state:

- learning rate: linear warmup over `warmup_steps` ((it + 1) / warmup), flat, then a linear
  warmdown over the last `warmdown_ratio` of the steps to `final_lr_frac` of the peak;
- Muon momentum: 0.85 -> 0.97 over the first 400 steps, then 0.97, falling linearly to 0.90
  over the warmdown;
- Muon weight decay: the scaled value (see `scaling`) on a cosine from 1x to 0 over the run;
- batch-size scaling of every learning rate and of the weight decay (`scaling`), anchored at
  d12 with 2**19 tokens per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from armlab.budget import REFERENCE_BATCH, Budget
from armlab.train.recipe import Hyperparameters

MOMENTUM_WARMUP_STEPS = 400
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END = 0.85, 0.97, 0.90


def lr_multiplier(
    step: int, num_iterations: int, warmup_steps: int, warmdown_ratio: float, final_lr_frac: float
) -> float:
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int, num_iterations: int, warmdown_ratio: float) -> float:
    warmdown = round(warmdown_ratio * num_iterations)
    warmdown_start = num_iterations - warmdown
    if step < MOMENTUM_WARMUP_STEPS:
        frac = step / MOMENTUM_WARMUP_STEPS
        return (1 - frac) * MOMENTUM_START + frac * MOMENTUM_PEAK
    if step >= warmdown_start:
        progress = (step - warmdown_start) / warmdown
        return MOMENTUM_PEAK * (1 - progress) + MOMENTUM_END * progress
    return MOMENTUM_PEAK


def weight_decay(step: int, num_iterations: int, scaled_weight_decay: float) -> float:
    return scaled_weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


@dataclass(frozen=True)
class Scaling:
    """What the reference hyperparameters become for this run's batch and horizon."""

    batch_lr_scale: float  # every learning rate is multiplied by it
    weight_decay: float  # Muon's weight decay at step 0

    def learning_rates(self, hp: Hyperparameters) -> dict[str, float]:
        """The keyword arguments of `optim.build_optimizer` (nanochat's setup_optimizer call)."""
        return {
            "unembedding_lr": hp.unembedding_lr * self.batch_lr_scale,
            "embedding_lr": hp.embedding_lr * self.batch_lr_scale,
            "scalar_lr": hp.scalar_lr * self.batch_lr_scale,
            "matrix_lr": hp.matrix_lr * self.batch_lr_scale,
            "weight_decay": self.weight_decay,
        }


def scaling(budget: Budget, weight_decay_base: float) -> Scaling:
    """lr x sqrt(B / 2**19); weight decay x sqrt(B / 2**19) x D_ref / D (T_epoch held constant)."""
    batch_ratio = budget.total_batch_size / REFERENCE_BATCH
    return Scaling(
        batch_lr_scale=batch_ratio**0.5 if batch_ratio != 1.0 else 1.0,
        weight_decay=weight_decay_base
        * math.sqrt(budget.total_batch_size / REFERENCE_BATCH)
        * (budget.reference_tokens / budget.target_tokens),
    )
