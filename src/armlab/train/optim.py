"""nanochat 92d63d4's optimiser (nanochat/optim.py, 2026-07-03): Muon for the transformer
matrices, AdamW for everything else, with nanochat's parameter groups (`build_optimizer`).

The two update rules are nanochat's fused steps, op for op (so that the parity tests agree to
float rounding), written as plain functions and compiled on CUDA as nanochat compiles them:

- AdamW: decoupled weight decay, lerp moments, bias correction, eps 1e-10; the math in fp32
  and written back into the parameter's dtype (the embeddings are bf16 on CUDA).
- Muon, per group of same-shape matrices stacked: Nesterov momentum -> MuonEq row equilibration
  (each row rescaled to the mean row norm, arXiv 2603.28254) -> Polar Express orthogonalisation
  (5 per-iteration polynomials, arXiv 2505.16932; in bf16 when training in bf16) -> Muon+
  renormalisation (Frobenius norm snapped to sqrt(min(rows, cols)), arXiv 2602.21545) ->
  NorMuon per-neuron variance normalisation (arXiv 2510.05491) -> cautious weight decay (decay
  only where update and weight agree in sign); lr scaled by sqrt(max(1, rows / cols)).

nanochat shards the optimiser state over ranks (ZeRO-2) and reduces gradients inside the step.
Here the training loop all-reduces the gradients first and every rank steps the whole
optimiser on identical gradients, so the states stay identical on every rank, a checkpoint
needs rank 0's copy only, and a resume is bitwise whatever the world size was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

REFERENCE_DIM = 768  # nanochat tuned the AdamW learning rates at width 768
ADAM_EPS = 1e-10

# Polar Express coefficients for 5 iterations (safety factor 2e-2, cushion 2), from the paper.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def adamw_step(
    p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
    step_t: Tensor, lr_t: Tensor, beta1_t: Tensor, beta2_t: Tensor, eps_t: Tensor, wd_t: Tensor,
) -> None:  # fmt: skip
    """One AdamW update of p in place; hyperparameters are 0-D fp32 CPU tensors (no recompiles)."""
    p32, exp_avg32, exp_avg_sq32, grad32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr_t * wd_t)
    exp_avg32.lerp_(grad32, 1 - beta1_t)
    exp_avg_sq32.lerp_(grad32.square(), 1 - beta2_t)
    bias1 = 1 - beta1_t**step_t
    bias2 = 1 - beta2_t**step_t
    denom = (exp_avg_sq32 / bias2).sqrt() + eps_t
    step_size = lr_t / bias1
    p32.add_(exp_avg32 / denom, alpha=-step_size)
    p.copy_(p32)
    exp_avg.copy_(exp_avg32)
    exp_avg_sq.copy_(exp_avg_sq32)


def polar_express(X: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise each matrix of a (N, rows, cols) stack (its polar factor)."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)
    if X.size(-2) > X.size(-1):  # tall
        for a, b, c in POLAR_EXPRESS[:steps]:
            A = X.mT @ X
            B = b * A + c * (A @ A)
            X = a * X + X @ B
    else:
        for a, b, c in POLAR_EXPRESS[:steps]:
            A = X @ X.mT
            B = b * A + c * (A @ A)
            X = a * X + B @ X
    return X


def muon_step(
    grads: Tensor, params: Tensor, momentum_buffer: Tensor, second_momentum_buffer: Tensor,
    momentum_t: Tensor, lr_t: Tensor, wd_t: Tensor, beta2_t: Tensor,
    ns_steps: int, red_dim: int, orthogonalise_dtype: torch.dtype,
) -> None:  # fmt: skip
    """One Muon update of a (N, rows, cols) stack of matrices in place (grads is overwritten)."""
    momentum = momentum_t.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - momentum)
    g = grads.lerp_(momentum_buffer, momentum)  # Nesterov
    X = g.to(orthogonalise_dtype)
    # MuonEq: every row to the mean row norm, so the spectrum entering the iteration is better conditioned
    target = X.float().norm(dim=(-2, -1), keepdim=True) / (X.size(-2) ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (target / row_norm).to(X.dtype)
    g = polar_express(X, ns_steps).to(params.dtype)
    # Muon+: an exactly semi-orthogonal matrix has Frobenius norm sqrt(min(rows, cols))
    target_norm = min(g.size(-2), g.size(-1)) ** 0.5
    current_norm = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * (target_norm / current_norm).to(g.dtype)
    # NorMuon: normalise each neuron's update by its running RMS, then restore the total norm
    beta2 = beta2_t.to(g.dtype)
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_dim_size = g.size(red_dim)
    v_norm = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_dim_size).sqrt()
    second_momentum_buffer.lerp_(v_mean.to(dtype=second_momentum_buffer.dtype), 1 - beta2)
    step_size = second_momentum_buffer.clamp_min(1e-10).rsqrt()
    scaled_sq_sum = (v_mean * red_dim_size) * step_size.float().square()
    v_norm_new = scaled_sq_sum.sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (step_size * (v_norm / v_norm_new.clamp_min(1e-10))).to(g.dtype)
    # cautious weight decay + the update
    lr, wd = lr_t.to(g.dtype), wd_t.to(g.dtype)
    mask = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * mask)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser over param groups tagged kind='muon' or kind='adamw' (nanochat's layout).

    Muon groups hold same-shape matrices and take `lr, momentum, ns_steps, beta2, weight_decay`;
    AdamW groups take `lr, betas, eps, weight_decay`. Every group keeps `initial_lr`; the loop sets
    `lr = initial_lr * lr_multiplier` (and Muon's momentum / weight_decay) before each step.
    `compute_dtype` bf16 runs the orthogonalisation in bf16, as nanochat does when it trains in bf16.
    With `compile` (default: on CUDA) the two steps are torch.compile'd like nanochat's fused kernels.
    """

    def __init__(
        self,
        param_groups: list[dict[str, Any]],
        compute_dtype: torch.dtype = torch.float32,
        compile: bool | None = None,
    ):
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            if group["kind"] == "muon" and len({p.shape for p in group["params"]}) != 1:
                raise ValueError("a Muon group must hold matrices of one shape")
        self.orthogonalise_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else None
        if compile is None:
            compile = any(p.is_cuda for g in self.param_groups for p in g["params"])
        self._adamw: Callable[..., None] = adamw_step
        self._muon: Callable[..., None] = muon_step
        if compile:
            self._adamw = torch.compile(adamw_step, dynamic=False, fullgraph=True)
            self._muon = torch.compile(muon_step, dynamic=False, fullgraph=True)
        # 0-D CPU tensors, refilled every step, so compiled steps never recompile for new values
        t = lambda: torch.tensor(0.0, dtype=torch.float32, device="cpu")  # noqa: E731
        self._adamw_t = {k: t() for k in ("step", "lr", "beta1", "beta2", "eps", "wd")}
        self._muon_t = {k: t() for k in ("momentum", "lr", "wd", "beta2")}

    @torch.no_grad()
    def step(self) -> None:  # type: ignore[override]
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._step_muon(group)
            elif group["kind"] == "adamw":
                self._step_adamw(group)
            else:
                raise ValueError(f"unknown optimizer kind {group['kind']!r}")

    def _step_adamw(self, group: dict[str, Any]) -> None:
        h = self._adamw_t
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            h["step"].fill_(state["step"])
            h["lr"].fill_(group["lr"])
            h["beta1"].fill_(group["betas"][0])
            h["beta2"].fill_(group["betas"][1])
            h["eps"].fill_(group["eps"])
            h["wd"].fill_(group["weight_decay"])
            self._adamw(p, p.grad, state["exp_avg"], state["exp_avg_sq"],
                        h["step"], h["lr"], h["beta1"], h["beta2"], h["eps"], h["wd"])  # fmt: skip

    def _step_muon(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        p = params[0]
        shape, rows, cols = p.shape, p.shape[-2], p.shape[-1]
        state = self.state[p]  # the group's stacked buffers live with its first matrix
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(len(params), *shape, dtype=p.dtype, device=p.device)
            # NorMuon's second moment, factored over the longer side: one value per neuron
            factored = (len(params), rows, 1) if rows >= cols else (len(params), 1, cols)
            state["second_momentum_buffer"] = torch.zeros(factored, dtype=p.dtype, device=p.device)
        red_dim = -1 if rows >= cols else -2
        h = self._muon_t
        h["momentum"].fill_(group["momentum"])
        h["beta2"].fill_(group["beta2"])
        h["lr"].fill_(group["lr"] * max(1.0, rows / cols) ** 0.5)  # tall matrices get a larger lr
        h["wd"].fill_(group["weight_decay"])
        grads = torch.stack([q.grad for q in params])
        stacked = torch.stack(params)
        self._muon(grads, stacked, state["momentum_buffer"], state["second_momentum_buffer"],
                   h["momentum"], h["lr"], h["wd"], h["beta2"], group["ns_steps"], red_dim,
                   self.orthogonalise_dtype or grads.dtype)  # fmt: skip
        torch._foreach_copy_(params, list(stacked.unbind(0)))


def build_optimizer(
    model: torch.nn.Module,
    *,
    embedding_lr: float,
    unembedding_lr: float,
    matrix_lr: float,
    scalar_lr: float,
    weight_decay: float,
    compile: bool | None = None,
) -> MuonAdamW:
    """nanochat's setup_optimizer: parameter groups, per-group learning rates, betas, decay.

    The learning rates passed in are already scaled for the batch (nanochat's base_train passes
    `lr * batch_lr_scale`); the AdamW ones are scaled here by 1/sqrt(model_dim / 768). The smear
    group's lr (0.2) is fixed, as in nanochat. Muon's weight decay is set per step by the loop.
    """
    cfg = model.config
    dim_scale = (cfg.model_dim / REFERENCE_DIM) ** -0.5
    matrices = list(model.transformer.h.parameters())
    adamw = dict(kind="adamw", eps=ADAM_EPS)
    groups: list[dict[str, Any]] = [
        dict(adamw, params=list(model.lm_head.parameters()), lr=unembedding_lr * dim_scale,
             betas=(0.8, 0.96), weight_decay=0.01),
        dict(adamw, params=list(model.transformer.wte.parameters()), lr=embedding_lr * dim_scale,
             betas=(0.8, 0.995), weight_decay=0.001),
        dict(adamw, params=list(model.value_embeds.parameters()), lr=embedding_lr * dim_scale * 0.5,
             betas=(0.8, 0.995), weight_decay=0.01),
        # the residual scalars move slowly; the x0 scalars get a longer first-moment memory
        dict(adamw, params=[model.resid_lambdas], lr=scalar_lr * 0.01, betas=(0.8, 0.95), weight_decay=0.05),
        dict(adamw, params=[model.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
        dict(adamw, params=[model.smear_gate.weight, model.smear_lambda, model.backout_lambda], lr=0.2,
             betas=(0.8, 0.95), weight_decay=0.0),
    ]  # fmt: skip
    for shape in sorted({p.shape for p in matrices}):
        groups.append(
            dict(
                kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay,
            )
        )  # fmt: skip
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len(list(model.parameters())), "every parameter belongs to exactly one group"
    return MuonAdamW(groups, compute_dtype=model.compute_dtype, compile=compile)
