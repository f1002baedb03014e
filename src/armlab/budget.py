"""Model size and token budget from the experiment file, without building the model.

The trainer, `armlab plan` and the token-budget check (DESIGN.md invariant 7) all ask the same
questions: how many parameters does depth D have, how many tokens will the run consume, in how
many steps of what batch. One place answers them; `armlab.train.model` asserts that the real
model has exactly `param_counts(...)` parameters.

Follows nanochat's Feb-2026 base-training recipe: model_dim = depth * aspect_ratio rounded up
to a multiple of head_dim; value embeddings on alternating layers (always the last) with a
12-channel gate; scaling parameters = transformer matrices + lm_head; horizon = ratio x
scaling params; auto batch size from the Power-Lines rule B ~ D^0.383, anchored at d12 with
2**19 tokens, rounded to a power of two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from armlab.errors import ArmlabError
from armlab.spec import Experiment, ModelSpec, TrainSpec

VE_GATE_CHANNELS = 12
PAD_VOCAB_TO = 64
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19


def model_dim(spec: ModelSpec) -> int:
    raw = spec.depth * spec.aspect_ratio
    return ((raw + spec.head_dim - 1) // spec.head_dim) * spec.head_dim


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Alternating layers carry a value embedding; the last layer always does."""
    return layer % 2 == (n_layer - 1) % 2


def padded_vocab(vocab_size: int) -> int:
    return ((vocab_size + PAD_VOCAB_TO - 1) // PAD_VOCAB_TO) * PAD_VOCAB_TO


@dataclass(frozen=True)
class ParamCounts:
    wte: int
    value_embeds: int
    lm_head: int
    transformer_matrices: int
    scalars: int

    @property
    def total(self) -> int:
        return self.wte + self.value_embeds + self.lm_head + self.transformer_matrices + self.scalars

    @property
    def scaling(self) -> int:
        """Parameters the token horizon scales with (nanochat: matrices + lm_head)."""
        return self.transformer_matrices + self.lm_head


def param_counts(spec: ModelSpec, vocab_size: int) -> ParamCounts:
    d = model_dim(spec)
    n_head = d // spec.head_dim
    v = padded_vocab(vocab_size)
    n_ve = sum(has_value_embedding(i, spec.depth) for i in range(spec.depth))
    per_layer = 12 * d * d  # q, k, v, o (4 d^2) + relu^2 MLP 4x (8 d^2)
    return ParamCounts(
        wte=v * d,
        value_embeds=n_ve * v * d,
        lm_head=d * v,
        transformer_matrices=spec.depth * per_layer + n_ve * VE_GATE_CHANNELS * n_head,
        scalars=2 * spec.depth,
    )


def flops_per_token(spec: ModelSpec, vocab_size: int) -> int:
    """Training FLOPs per token: 6 x (matrices + lm_head) + attention (12 h q T per layer)."""
    pc = param_counts(spec, vocab_size)
    d = model_dim(spec)
    attn = spec.depth * 12 * d * spec.max_seq_len  # h * q == d
    return 6 * pc.scaling + attn


@dataclass(frozen=True)
class Budget:
    params: ParamCounts
    total_batch_size: int  # tokens per optimiser step, all ranks
    num_iterations: int
    tokens: int  # tokens the run consumes = num_iterations * total_batch_size
    flops_per_token: int


def auto_batch_size(spec: ModelSpec, train: TrainSpec, vocab_size: int, target_tokens: int) -> int:
    ref = ModelSpec(
        depth=REFERENCE_DEPTH,
        max_seq_len=spec.max_seq_len,
        aspect_ratio=spec.aspect_ratio,
        head_dim=spec.head_dim,
    )
    d_ref = train.param_data_ratio * param_counts(ref, vocab_size).scaling
    predicted = REFERENCE_BATCH * (target_tokens / d_ref) ** 0.383
    return 2 ** max(0, round(math.log2(max(predicted, 1.0))))


def training_budget(exp: Experiment, vocab_size: int | None = None) -> Budget:
    """Steps, batch and tokens of one run of this experiment (identical for every arm)."""
    vocab = vocab_size or exp.tokenizer.vocab_size
    pc = param_counts(exp.model, vocab)
    train = exp.train
    if train.tokens is not None:
        target = train.tokens
    elif train.num_iterations is not None:
        target = None
    else:
        target = int(train.param_data_ratio * pc.scaling)
    if train.total_batch_size is not None:
        tbs = train.total_batch_size
    else:
        guess = target if target is not None else train.num_iterations * REFERENCE_BATCH
        tbs = auto_batch_size(exp.model, train, vocab, guess)
    tbs = max(tbs, exp.model.max_seq_len)
    steps = train.num_iterations if train.num_iterations is not None else max(1, target // tbs)
    return Budget(
        params=pc,
        total_batch_size=tbs,
        num_iterations=steps,
        tokens=steps * tbs,
        flops_per_token=flops_per_token(exp.model, vocab),
    )


def grad_accum_steps(total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int) -> int:
    """Micro-steps per optimiser step; refuses a total batch the ranks cannot split evenly."""
    per_step = device_batch_size * seq_len * world_size
    if total_batch_size % per_step:
        options = sorted(
            {
                total_batch_size // (seq_len * world_size * k)
                for k in (1, 2, 4, 8, 16, 32, 64)
                if total_batch_size % (seq_len * world_size * k) == 0
            }
        )
        hint = f"device_batch_size in {options}" if options else f"total_batch_size a multiple of {per_step}"
        raise ArmlabError(
            f"--total-batch-size {total_batch_size} is not divisible by device_batch_size x max_seq_len x world_size "
            f"= {device_batch_size} x {seq_len} x {world_size} = {per_step}; use {hint}"
        )
    return total_batch_size // per_step
