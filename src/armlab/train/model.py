"""The GPT that every arm trains: nanochat 92d63d4's base model (nanochat/gpt.py, 2026-07-03).

- width = depth x aspect_ratio rounded up to a multiple of the head dim (128); heads of 128
- rotary position embeddings (base 100,000, no learned positions), QK RMSNorm, then q and k
  scaled by 1.2 (sharper attention)
- sliding-window attention tiled over the layers by `window_pattern` (default SSSL: three
  layers see a quarter of the context, one the whole; the last layer always the whole), through
  FlashAttention 3 on Hopper or SDPA with a band mask elsewhere (armlab.train.attention)
- parameter-free RMSNorm, pre-norm blocks, ReLU^2 MLP (4x), no biases
- untied token embedding and lm_head, vocab padded to a multiple of 64
- smear: each position adds a gated share of the previous token's normalised embedding (a
  cheap bigram signal); backout: the residual of the middle layer, times a learned 0.2, is
  subtracted before the final norm
- value embeddings (ResFormer) on alternating layers, the last always, mixed into the
  attention values through a per-head gate 3 * sigmoid(W x[:12])
- per-layer scalars: `resid_lambdas` scale the residual stream, `x0_lambdas` blend the
  normalised (smeared) embedding back in before every block
- logits soft-capped at 15, computed in fp32
- mixed precision without autocast: master weights stay fp32, the token and value embeddings
  are stored in the compute dtype (bf16 on CUDA), so activations are bf16 and every `Linear`
  casts its weight to the activation dtype; on CPU everything is fp32

Parameter names and shapes are nanochat's, so a state dict moves between the two unchanged
(`armlab export`, and the parity tests load nanochat's weights into this model). The init
draws the same random numbers in the same order as nanochat's `init_weights`, so a model built
by `build_model` from a seed equals nanochat's from the same seed. The parameter count equals
`armlab.budget.param_counts(...)` exactly (asserted at build time), so `armlab plan` and the
trainer agree on model size and token horizon.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from armlab.budget import (
    SMEAR_CHANNELS,
    VE_GATE_CHANNELS,
    has_value_embedding,
    model_dim,
    padded_vocab,
    param_counts,
    window_sizes,
)
from armlab.spec import ModelSpec
from armlab.train.attention import attend
from armlab.train.recipe import WINDOW_PATTERN

LOGIT_SOFTCAP = 15.0
ROPE_BASE = 100_000
QK_SCALE = 1.2
VE_GATE_RANGE = 3.0  # the value-embedding gate is VE_GATE_RANGE * sigmoid(.)


@dataclass(frozen=True)
class GPTConfig:
    depth: int
    vocab_size: int  # the tokenizer's; logits are cropped to it
    seq_len: int = 2048
    aspect_ratio: int = 64
    head_dim: int = 128
    window_pattern: str = WINDOW_PATTERN

    @classmethod
    def from_spec(cls, spec: ModelSpec, vocab_size: int) -> GPTConfig:
        return cls(
            spec.depth, vocab_size, spec.max_seq_len, spec.aspect_ratio, spec.head_dim,
            spec.window_pattern or WINDOW_PATTERN,
        )  # fmt: skip

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(
            depth=self.depth, max_seq_len=self.seq_len, aspect_ratio=self.aspect_ratio,
            head_dim=self.head_dim, window_pattern=self.window_pattern,
        )  # fmt: skip

    @property
    def model_dim(self) -> int:
        return model_dim(self.spec)

    @property
    def n_head(self) -> int:
        return self.model_dim // self.head_dim

    @property
    def padded_vocab(self) -> int:
        return padded_vocab(self.vocab_size)

    @property
    def window_sizes(self) -> list[int]:
        return window_sizes(self.depth, self.seq_len, self.window_pattern)

    def to_dict(self) -> dict[str, int | str]:
        return asdict(self)

    def nanochat_config(self) -> dict[str, int | str]:
        """The same model as nanochat's GPTConfig kwargs (what its checkpoints' meta holds)."""
        return {
            "sequence_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "n_layer": self.depth,
            "n_head": self.n_head,
            "n_kv_head": self.n_head,
            "n_embd": self.model_dim,
            "window_pattern": self.window_pattern,
        }


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without learnable parameters (in the activation dtype)."""
    return F.rms_norm(x, (x.size(-1),))


class Linear(nn.Linear):
    """nn.Linear that casts its (fp32 master) weight to the input's dtype: autocast without autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(dtype=x.dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x: (B, T, H, D) by position (nanochat's sign)."""
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], 3)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        dim = cfg.model_dim
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.c_q = Linear(dim, dim, bias=False)
        self.c_k = Linear(dim, dim, bias=False)
        self.c_v = Linear(dim, dim, bias=False)
        self.c_proj = Linear(dim, dim, bias=False)
        # Value-embedding gate: one scalar per head in (0, 3), from the first 12 input channels.
        has_ve = has_value_embedding(layer, cfg.depth)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_head, bias=False) if has_ve else None

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, window: int
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:
            gate = VE_GATE_RANGE * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE  # QK norm, then a sharper softmax
        y = attend(q, k, v, window)
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.model_dim, 4 * cfg.model_dim, bias=False)
        self.c_proj = Linear(4 * cfg.model_dim, cfg.model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, window: int
    ) -> torch.Tensor:
        x = x + self.attn(norm(x), ve, cos, sin, window)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    """Build it with `build_model` (meta device, then storage, then init), as nanochat does."""

    def __init__(self, cfg: GPTConfig, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = cfg
        self.compute_dtype = compute_dtype
        self.window_sizes = cfg.window_sizes
        dim, vocab = cfg.model_dim, cfg.padded_vocab
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(vocab, dim), "h": nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))}
        )
        self.lm_head = Linear(dim, vocab, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.depth))
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.depth))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(vocab, dim) for i in range(cfg.depth) if has_value_embedding(i, cfg.depth)}
        )
        cos, sin = self._rotary(cfg.seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        expected = param_counts(cfg.spec, cfg.vocab_size).total
        actual = sum(p.numel() for p in self.parameters())
        assert actual == expected, f"GPT has {actual:,} parameters, armlab.budget says {expected:,}"

    def _rotary(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        hd, device = self.config.head_dim, self.transformer.wte.weight.device
        inv_freq = 1.0 / (ROPE_BASE ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
        cos, sin = freqs.cos().to(self.compute_dtype), freqs.sin().to(self.compute_dtype)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, T, 1, D/2)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat 92d63d4's init, drawing in its order: wte N(0, 0.8), lm_head N(0, 0.001),
        q/k/v U(+-sqrt(3/dim)) (the std of N(0, 1/dim) without outliers), c_fc 0.4x that, output
        projections zero; resid_lambdas 1.15 -> 1.05 and x0_lambdas 0.20 -> 0.05 over the layers;
        smear 0 (off), backout 0.2, smear gate and value-embedding gates U(0, 0.02) (slightly open);
        value embeddings like c_v."""
        dim, n_layer = self.config.model_dim, self.config.depth
        s = 3**0.5 * dim**-0.5
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            nn.init.uniform_(block.attn.c_q.weight, -s, s)
            nn.init.uniform_(block.attn.c_k.weight, -s, s)
            nn.init.uniform_(block.attn.c_v.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -s * 0.4, s * 0.4)
            nn.init.zeros_(block.mlp.c_proj.weight)
        for i in range(n_layer):
            self.resid_lambdas.data[i] = 1.15 - (0.10 * i / max(n_layer - 1, 1))
            self.x0_lambdas.data[i] = 0.20 - (0.15 * i / max(n_layer - 1, 1))
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -s, s)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Rotary tables, and the embeddings in the compute dtype (fp16 would need fp32 ones: no
        GradScaler here, so fp16 is not offered)."""
        self.cos, self.sin = self._rotary(self.config.seq_len)
        self.transformer.wte.to(dtype=self.compute_dtype)
        for ve in self.value_embeds.values():
            ve.to(dtype=self.compute_dtype)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, loss_reduction: str = "mean"
    ) -> torch.Tensor:
        """Logits (B, T, vocab) in fp32, or with `targets` the cross-entropy (ignore_index -1)."""
        B, T = idx.shape
        if self.cos.size(1) < T:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len {self.cos.size(1)}")
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = norm(self.transformer.wte(idx).to(self.compute_dtype))
        if T > 1:  # smear: mix the previous token's embedding into each position (none before the first)
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            x = torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        x0 = x
        backout_layer = self.config.depth // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, self.window_sizes[i])
            if i == backout_layer:
                x_backout = x
        if x_backout is not None:  # remove the mid-layer residual's low-level features before the head
            x = x - self.backout_lambda.to(x.dtype) * x_backout
        logits = self.lm_head(norm(x))[..., : self.config.vocab_size].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(
            logits.reshape(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=-1,
            reduction=loss_reduction,
        )


def compute_dtype_for(device: torch.device | str) -> torch.dtype:
    """nanochat's choice: bf16 on CUDA from Ampere (sm80) on, fp32 on older GPUs and on CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def build_model(
    cfg: GPTConfig,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
    init: bool = True,
) -> GPT:
    """Shapes on the meta device, storage on `device`, then nanochat's init (or, with init=False,
    only the buffers, for a model about to receive a checkpoint's weights)."""
    with torch.device("meta"):
        model = GPT(cfg, compute_dtype)
    model.to_empty(device=device)
    if init:
        model.init_weights()
    else:
        model.init_buffers()
    return model
