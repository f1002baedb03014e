"""nanochat's optimiser: Muon for the transformer matrices, AdamW for everything else.

`torch.optim.Muon` (torch >= 2.9) does not fit nanochat's recipe: it has one fixed quintic
Newton-Schulz polynomial, no NorMuon variance reduction and plain (not cautious) weight decay.
So this is a compact re-implementation of nanochat's combined step:

- Muon (per group of same-shape matrices, stacked): Nesterov momentum -> Polar Express
  orthogonalisation (5 per-iteration polynomials, arXiv 2505.16932) -> NorMuon per-neuron
  variance normalisation (arXiv 2510.05491) -> cautious decoupled weight decay (decay only
  where update and weight agree in sign); lr scaled by sqrt(max(1, rows / cols)).
- AdamW: betas (0.8, 0.95), eps 1e-10, no weight decay on embeddings, head or scalars.

Under DDP every rank holds the whole optimiser and steps on identical (all-reduced) gradients,
so states stay identical across ranks and a checkpoint needs rank 0's copy only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from armlab.train.model import GPT

ADAM_BETAS = (0.8, 0.95)
ADAM_EPS = 1e-10
REFERENCE_DIM = 768  # nanochat tuned the AdamW learning rates at width 768

# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), from the paper.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express(g: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise each matrix of a (N, rows, cols) stack (its polar factor)."""
    x = g.bfloat16() if g.is_cuda else g  # bf16 is stable here and fast on GPU; CPU keeps fp32
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = x @ x.mT
        x = a * x + (b * A + c * (A @ A)) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser over param groups tagged kind='muon' or kind='adamw'.

    Muon groups hold same-shape matrices and take `lr, momentum, beta2, weight_decay`; AdamW
    groups take `lr, betas, eps, weight_decay`. Every group keeps `initial_lr`; the loop sets
    `lr = initial_lr * lr_multiplier` (and Muon's momentum / weight_decay) before each step.
    """

    def __init__(self, param_groups: list[dict[str, Any]]):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon" and len({p.shape for p in group["params"]}) != 1:
                raise ValueError("a Muon group must hold matrices of one shape")

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _adamw(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            state["step"] += 1
            t = state["step"]
            grad, p32 = p.grad.float(), p.float()
            p32.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
            denom = (state["exp_avg_sq"] / (1 - beta2**t)).sqrt_().add_(group["eps"])
            p32.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**t))
            p.copy_(p32)

    def _muon(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        rows, cols = params[0].shape
        state = self.state[params[0]]  # group buffers live with the group's first matrix
        if "momentum" not in state:
            state["momentum"] = torch.zeros(
                len(params), rows, cols, dtype=params[0].dtype, device=params[0].device
            )
            # NorMuon's second moment, factored over the longer side: one value per neuron.
            shape = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_moment"] = torch.zeros(shape, dtype=torch.float32, device=params[0].device)
        red_dim = -1 if rows >= cols else -2
        grads = torch.stack([p.grad for p in params])
        weights = torch.stack(params)

        # Nesterov momentum.
        buf = state["momentum"]
        buf.lerp_(grads, 1 - group["momentum"])
        g = grads.lerp_(buf, group["momentum"])
        g = polar_express(g)

        # NorMuon: normalise each neuron's update by its running RMS, then restore the total norm.
        v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
        n_red = g.size(red_dim)
        v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * n_red).sqrt()
        state["second_moment"].lerp_(v_mean, 1 - group["beta2"])
        step_size = state["second_moment"].clamp_min(1e-10).rsqrt()
        v_norm_new = ((v_mean * n_red) * step_size.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)

        # Cautious weight decay, then the update; tall matrices get a larger lr.
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        mask = (g * weights) >= 0
        weights.sub_(lr * g + lr * group["weight_decay"] * weights * mask)
        torch._foreach_copy_(params, list(weights.unbind(0)))


def build_optimizer(
    model: GPT,
    *,
    embedding_lr: float,
    unembedding_lr: float,
    matrix_lr: float,
    scalar_lr: float,
    weight_decay: float,
    batch_lr_scale: float = 1.0,
) -> MuonAdamW:
    """nanochat's parameter groups and learning rates.

    AdamW learning rates scale as 1/sqrt(model_dim / 768); every learning rate scales by
    `batch_lr_scale` (sqrt(total_batch / 2**19), see schedule.hyperparameters).
    """
    dim_scale = (model.config.model_dim / REFERENCE_DIM) ** -0.5
    matrices = [p for p in model.transformer.h.parameters()]
    adam = dict(kind="adamw", betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
    groups: list[dict[str, Any]] = [
        dict(adam, params=list(model.lm_head.parameters()), lr=unembedding_lr * dim_scale * batch_lr_scale),
        dict(
            adam,
            params=list(model.transformer.wte.parameters()),
            lr=embedding_lr * dim_scale * batch_lr_scale,
        ),
        dict(
            adam, params=list(model.value_embeds.parameters()), lr=embedding_lr * dim_scale * batch_lr_scale
        ),
        # The residual scalars move slowly; the x0 scalars get a longer first-moment memory.
        dict(adam, params=[model.resid_lambdas], lr=scalar_lr * 0.01 * batch_lr_scale),
        dict(adam, params=[model.x0_lambdas], lr=scalar_lr * batch_lr_scale, betas=(0.96, 0.95)),
    ]
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(
            dict(
                kind="muon",
                params=[p for p in matrices if tuple(p.shape) == shape],
                lr=matrix_lr * batch_lr_scale,
                momentum=0.95,
                beta2=0.95,
                weight_decay=weight_decay,
            )
        )
    groups = [g for g in groups if g["params"]]
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters())), "every parameter belongs to exactly one group"
    return MuonAdamW(groups)
