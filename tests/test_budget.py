"""Model size and token budget (nanochat 92d63d4's recipe; tests/test_train_parity.py checks it against nanochat itself)."""

from __future__ import annotations

import pytest

from armlab.budget import grad_accum_steps, param_counts, training_budget
from armlab.errors import ArmlabError
from armlab.spec import ModelSpec, parse_experiment


def test_param_counts_match_nanochat_reference_counts() -> None:
    # nanochat's logged counts at vocab 32768: d8 and d12 transformer matrices and lm_head.
    d8, d12 = param_counts(ModelSpec(depth=8), 32768), param_counts(ModelSpec(depth=12), 32768)
    assert (d8.transformer_matrices, d8.lm_head) == (25_166_016, 16_777_216)
    assert (d12.transformer_matrices, d12.lm_head) == (84_935_088, 25_165_824)


def exp(**train):
    return parse_experiment(
        {
            "name": "t",
            "pool": {"uri": "p"},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
            "model": {"depth": 12},
            "train": train,
        }
    )


def test_horizon_from_ratio_tokens_or_iterations() -> None:
    b = training_budget(exp(total_batch_size=524288))
    assert b.tokens == b.num_iterations * 524288
    assert abs(b.tokens - 12 * b.params.scaling) < 524288  # nanochat 92d63d4's default ratio
    assert training_budget(exp(tokens=10 * 524288, total_batch_size=524288)).num_iterations == 10
    assert training_budget(exp(num_iterations=7, total_batch_size=4096)).tokens == 7 * 4096


def test_auto_batch_is_power_of_two_and_reference_at_d12() -> None:
    b = training_budget(exp())
    assert b.total_batch_size == 2**19  # the rule is anchored at d12 with 2**19 tokens


def test_grad_accum_refuses_uneven_split_and_says_what_works() -> None:
    assert grad_accum_steps(524288, 32, 2048, 8) == 1
    assert grad_accum_steps(524288, 16, 2048, 8) == 2
    with pytest.raises(ArmlabError, match=r"device_batch_size in \["):
        grad_accum_steps(524288, 24, 2048, 8)


def test_num_iterations_keeps_the_ratio_horizon_for_batch_size_and_reference() -> None:
    # nanochat sizes the batch (and the weight decay) from the ratio's horizon even when the
    # steps are given: a short smoke run of d12 still steps 2**19 tokens at a time
    b = training_budget(exp(num_iterations=5))
    assert b.total_batch_size == 2**19 and b.num_iterations == 5
    assert b.target_tokens == int(12 * b.params.scaling) and b.reference_tokens == b.target_tokens


def test_window_pattern_changes_flops_not_params() -> None:
    full, sssl = ModelSpec(depth=4, window_pattern="L"), ModelSpec(depth=4)
    assert param_counts(full, 32768) == param_counts(sssl, 32768)
    from armlab.budget import flops_per_token, window_sizes

    assert window_sizes(4, 2048) == [512, 512, 512, 2048]  # SSSL; the last layer always full
    assert window_sizes(2, 2048, "L") == [2048, 2048]
    d = 256  # depth 4 x 64
    assert flops_per_token(full, 32768) - flops_per_token(sssl, 32768) == 3 * 12 * d * (2048 - 512)
