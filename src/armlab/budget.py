"""Model size, FLOPs and token budget from the experiment file, without building the model.

The trainer, `armlab plan` and the token-budget check (DESIGN.md invariant 7) all ask the same
questions: how many parameters does depth D have, how many tokens will the run consume, in how
many steps of what batch. One place answers them; `armlab.train.model` asserts that the real
model has exactly `param_counts(...)` parameters.

Follows nanochat 92d63d4 (gpt.py, scripts/base_train.py): model_dim = depth * aspect_ratio
rounded up to a multiple of head_dim; value embeddings on alternating layers (always the last)
with a 12-channel gate; a 24-channel smear gate and smear/backout scalars; scaling parameters =
transformer matrices + lm_head; horizon D = ratio (default 12) x scaling params; auto batch size
from the Power-Lines rule B ~ D^0.383 (arXiv 2505.13738), anchored at d12 with 2**19 tokens,
rounded to a power of two; FLOPs per token = 6 x matmul weights + 12 h q min(window, T) summed
over layers (nanochat's estimate_flops, sliding windows counted per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from armlab.errors import ArmlabError
from armlab.spec import Experiment, ModelSpec, TrainSpec
from armlab.train.recipe import WINDOW_PATTERN

VE_GATE_CHANNELS = 12
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the normalised embedding
PAD_VOCAB_TO = 64
REFERENCE_DEPTH = 12
REFERENCE_BATCH = 2**19
WINDOW_TILE = 128  # short windows are rounded up to FlashAttention 3's tile size


def model_dim(spec: ModelSpec) -> int:
    raw = spec.depth * spec.aspect_ratio
    return ((raw + spec.head_dim - 1) // spec.head_dim) * spec.head_dim


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Alternating layers carry a value embedding; the last layer always does."""
    return layer % 2 == (n_layer - 1) % 2


def padded_vocab(vocab_size: int) -> int:
    return ((vocab_size + PAD_VOCAB_TO - 1) // PAD_VOCAB_TO) * PAD_VOCAB_TO


def window_sizes(n_layer: int, seq_len: int, pattern: str | None = None) -> list[int]:
    """Tokens each layer attends back to (nanochat's `window_size[0]`, FA3's left window).

    The pattern is tiled over the layers; L = the full context (seq_len), S = a quarter of it
    rounded up to a multiple of 128; the last layer is always L.
    """
    pattern = (pattern or WINDOW_PATTERN).upper()
    short = -(-seq_len // 4 // WINDOW_TILE) * WINDOW_TILE
    sizes = [short if pattern[i % len(pattern)] == "S" else seq_len for i in range(n_layer)]
    sizes[-1] = seq_len
    return sizes


@dataclass(frozen=True)
class ParamCounts:
    wte: int
    value_embeds: int
    lm_head: int
    transformer_matrices: int
    scalars: int  # resid/x0 lambdas, the smear gate, smear and backout lambdas

    @property
    def total(self) -> int:
        return self.wte + self.value_embeds + self.lm_head + self.transformer_matrices + self.scalars

    @property
    def scaling(self) -> int:
        """Parameters the token horizon scales with (nanochat: matrices + lm_head)."""
        return self.transformer_matrices + self.lm_head

    @property
    def matmul(self) -> int:
        """Weights that multiply the token stream (nanochat's num_matmul_params): 2 FLOPs each forward."""
        return self.transformer_matrices + self.lm_head + SMEAR_CHANNELS


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
        scalars=2 * spec.depth + SMEAR_CHANNELS + 2,
    )


def flops_per_token(spec: ModelSpec, vocab_size: int) -> int:
    """Training FLOPs per token (forward + backward), nanochat's estimate_flops."""
    pc = param_counts(spec, vocab_size)
    d = model_dim(spec)  # n_head * head_dim
    T = spec.max_seq_len
    attn = sum(12 * d * min(w, T) for w in window_sizes(spec.depth, T, spec.window_pattern))
    return 6 * pc.matmul + attn


@dataclass(frozen=True)
class Budget:
    params: ParamCounts
    total_batch_size: int  # tokens per optimiser step, all ranks
    num_iterations: int
    tokens: int  # tokens the run consumes = num_iterations * total_batch_size
    flops_per_token: int
    target_tokens: int  # the horizon D the batch size and weight decay are scaled for
    reference_tokens: float  # D_ref: d12's horizon at the same ratio


def reference_tokens(spec: ModelSpec, train: TrainSpec, vocab_size: int) -> float:
    """D_ref: the horizon of the d12 reference model at this ratio (same width rule and vocab)."""
    ref = spec.model_copy(update={"depth": REFERENCE_DEPTH})
    return train.param_data_ratio * param_counts(ref, vocab_size).scaling


def auto_batch_size(target_tokens: int, reference: float) -> int:
    """nanochat's optimal total batch: 2**19 x (D / D_ref)^0.383, rounded to a power of two."""
    predicted = REFERENCE_BATCH * (target_tokens / reference) ** 0.383
    return 2 ** max(0, round(math.log2(max(predicted, 1.0))))


def training_budget(exp: Experiment, vocab_size: int | None = None) -> Budget:
    """Steps, batch and tokens of one run of this experiment (identical for every arm).

    The horizon is `tokens`, else `num_iterations` steps, else ratio x scaling parameters. The
    auto batch size and the weight-decay scaling use D = `tokens` when given, else the ratio's
    horizon (as nanochat does when the steps are given explicitly).
    """
    vocab = vocab_size or exp.tokenizer.vocab_size
    pc = param_counts(exp.model, vocab)
    train = exp.train
    target = train.tokens if train.tokens is not None else int(train.param_data_ratio * pc.scaling)
    ref = reference_tokens(exp.model, train, vocab)
    tbs = train.total_batch_size if train.total_batch_size is not None else auto_batch_size(target, ref)
    tbs = max(tbs, exp.model.max_seq_len)
    steps = train.num_iterations if train.num_iterations is not None else max(1, target // tbs)
    return Budget(
        params=pc,
        total_batch_size=tbs,
        num_iterations=steps,
        tokens=steps * tbs,
        flops_per_token=flops_per_token(exp.model, vocab),
        target_tokens=target,
        reference_tokens=ref,
    )


def batch_phrase(train: TrainSpec, total_batch_size: int, flag: bool = False) -> str:
    """The total batch as the user set it, for a message: the flag they typed, the key in their
    file, or the automatic size (never a flag they did not type)."""
    if flag:
        return f"--total-batch-size {total_batch_size}"
    if train.total_batch_size is None:
        return f"the automatic total batch size {total_batch_size:,} (train.total_batch_size is unset)"
    return f"train.total_batch_size = {total_batch_size}"


def grad_accum_steps(
    total_batch_size: int, device_batch_size: int, seq_len: int, world_size: int, what: str | None = None
) -> int:
    """Micro-steps per optimiser step; refuses a total batch the ranks cannot split evenly.
    `what` names the total batch in the message (`batch_phrase`)."""
    per_step = device_batch_size * seq_len * world_size
    what = what or f"--total-batch-size {total_batch_size}"
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
            f"{what} is not divisible by device_batch_size x max_seq_len x ranks "
            f"= {device_batch_size} x {seq_len} x {world_size} = {per_step}; use {hint}"
        )
    return total_batch_size // per_step
