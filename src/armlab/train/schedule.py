"""nanochat's training schedules, as pure functions of the step (so resuming needs no state).

- learning rate: linear warmup over `warmup_ratio` of the run, flat, then a linear warmdown
  over the last `warmdown_ratio` to `final_lr_frac`;
- Muon momentum: 0.85 -> 0.95 over the first 300 steps;
- Muon weight decay: linear to zero over the run, from `weight_decay` scaled by
  (12 / depth)^2 (tuned at d12, scaling ~ 1 / width^2);
- all learning rates scale by sqrt(total_batch_size / 2**19) (tuned at 2**19 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.budget import REFERENCE_BATCH, REFERENCE_DEPTH

MOMENTUM_WARMUP_STEPS = 300


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int) -> float:
    frac = min(step / MOMENTUM_WARMUP_STEPS, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def weight_decay(step: int, num_iterations: int, scaled_weight_decay: float) -> float:
    return scaled_weight_decay * (1 - step / num_iterations)


@dataclass(frozen=True)
class Scaling:
    batch_lr_scale: float
    weight_decay: float


def scaling(depth: int, total_batch_size: int, weight_decay_base: float) -> Scaling:
    """Depth- and batch-dependent corrections of the d12 / 2**19-token tuned hyperparameters."""
    return Scaling(
        batch_lr_scale=(total_batch_size / REFERENCE_BATCH) ** 0.5,
        weight_decay=weight_decay_base * (REFERENCE_DEPTH / depth) ** 2,
    )
