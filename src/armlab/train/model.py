"""The GPT that every arm trains: nanochat's February-2026 base model.

- width = depth x aspect_ratio rounded up to a multiple of the head dim (128); heads of 128
- rotary position embeddings (no learned positions), QK RMSNorm
- parameter-free RMSNorm, pre-norm blocks, ReLU^2 MLP (4x), no biases
- untied token embedding and lm_head, vocab padded to a multiple of 64
- value embeddings (ResFormer) on alternating layers, the last always, mixed into the
  attention values through a per-head gate that reads the first 12 channels of the input
- per-layer scalars: `resid_lambdas` scale the residual stream, `x0_lambdas` blend the
  normalised token embedding back in before every block
- logits soft-capped at 15, computed in fp32
- full causal attention through F.scaled_dot_product_attention

The parameter count equals `armlab.budget.param_counts(...)` exactly (asserted at build time),
so `armlab plan` and the trainer agree on model size and token horizon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from armlab.budget import VE_GATE_CHANNELS, has_value_embedding, model_dim, padded_vocab, param_counts
from armlab.spec import ModelSpec

LOGIT_SOFTCAP = 15.0
ROPE_BASE = 10_000


@dataclass(frozen=True)
class GPTConfig:
    depth: int
    vocab_size: int  # the tokenizer's; logits are cropped to it
    seq_len: int = 2048
    aspect_ratio: int = 64
    head_dim: int = 128

    @classmethod
    def from_spec(cls, spec: ModelSpec, vocab_size: int) -> GPTConfig:
        return cls(spec.depth, vocab_size, spec.max_seq_len, spec.aspect_ratio, spec.head_dim)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            depth=self.depth, max_seq_len=self.seq_len, aspect_ratio=self.aspect_ratio, head_dim=self.head_dim
        )

    @property
    def model_dim(self) -> int:
        return model_dim(self.spec)

    @property
    def n_head(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable parameters."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x: (B, T, H, D) by position."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        # Value-embedding gate: one scalar per head in (0, 2), from the first 12 input channels.
        has_ve = has_value_embedding(layer, cfg.depth)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_head, bias=False) if has_ve else None

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        dtype = v.dtype  # bf16 under CUDA autocast, fp32 on CPU: SDPA wants one dtype for q, k, v
        if ve is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = norm(q).to(dtype), norm(k).to(dtype), v.to(dtype)  # QK norm
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.model_dim, 4 * cfg.model_dim, bias=False)
        self.c_proj = nn.Linear(4 * cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        dim, vocab = cfg.model_dim, cfg.padded_vocab
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(vocab, dim), "h": nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))}
        )
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.depth))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, dim) for i in range(cfg.depth) if has_value_embedding(i, cfg.depth)}
        )
        cos, sin = self._rotary(cfg.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        expected = param_counts(cfg.spec, cfg.vocab_size).total
        actual = sum(p.numel() for p in self.parameters())
        assert actual == expected, f"GPT has {actual:,} parameters, armlab.budget says {expected:,}"

    def _rotary(self, seq_len: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.head_dim
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: embeddings N(0, 1), lm_head N(0, 0.001), matrices U(+-sqrt(3/dim))
        (same std as N(0, 1/dim) without outliers), output projections and gates zero."""
        dim = self.config.model_dim
        s = (3 / dim) ** 0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate 2 * sigmoid(0) = 1: neutral start
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        self.cos, self.sin = self._rotary(self.config.seq_len, self.transformer.wte.weight.device)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean"
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or with `targets` the cross-entropy (ignore_index -1)."""
        B, T = idx.shape
        if self.cos.size(1) < T:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cos.size(1)}")
        x = norm(self.transformer.wte(idx))
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin)
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=reduction
        )
