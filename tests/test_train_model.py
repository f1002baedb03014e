"""The model, optimiser and schedules, in-process (fast): sizes, recipe details, learning.

Equality with nanochat itself (logits, optimiser steps, hyperparameters) is
tests/test_train_parity.py; these are the properties that hold on their own."""

from __future__ import annotations

import math

import pytest
import torch

from armlab.budget import param_counts
from armlab.spec import ModelSpec
from armlab.train import schedule
from armlab.train.model import GPT, GPTConfig, build_model
from armlab.train.optim import build_optimizer, polar_express


def tiny(depth: int = 2, vocab: int = 300, seq: int = 64, seed: int = 0, pattern: str = "SSSL") -> GPT:
    torch.manual_seed(seed)
    return build_model(GPTConfig(depth=depth, vocab_size=vocab, seq_len=seq, window_pattern=pattern))


@pytest.mark.parametrize("depth,vocab", [(1, 300), (2, 400), (4, 1000), (6, 32768), (12, 32768)])
def test_param_count_equals_budget(depth: int, vocab: int) -> None:
    spec = ModelSpec(depth=depth, max_seq_len=64)
    with torch.device("meta"):  # shapes only: d12 with a 32k vocab would take a while to init on CPU
        m = GPT(GPTConfig.from_spec(spec, vocab))
    pc = param_counts(spec, vocab)
    assert sum(p.numel() for p in m.parameters()) == pc.total
    assert sum(p.numel() for p in m.transformer.h.parameters()) == pc.transformer_matrices
    assert m.lm_head.weight.numel() == pc.lm_head
    assert sum(p.numel() for p in m.value_embeds.parameters()) == pc.value_embeds


def test_architecture_follows_nanochat() -> None:
    m = GPT(GPTConfig(depth=4, vocab_size=1000, seq_len=64))
    cfg = m.config
    assert cfg.model_dim == 256 and cfg.n_head == 2  # 4 x 64 = 256, heads of 128
    assert GPTConfig(depth=3, vocab_size=1000).model_dim == 256  # 192 rounded up to a multiple of 128
    assert m.lm_head.weight.shape[0] == 1024  # padded to a multiple of 64
    assert sorted(m.value_embeds) == ["1", "3"]  # alternating, the last layer always
    assert [b.attn.ve_gate is not None for b in m.transformer.h] == [False, True, False, True]
    assert m.transformer.h[1].attn.ve_gate.weight.shape == (2, 12)
    assert m.smear_gate.weight.shape == (1, 24) and m.smear_lambda.shape == m.backout_lambda.shape == (1,)
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert m.transformer.wte.weight.data_ptr() != m.lm_head.weight.data_ptr()  # untied


def test_forward_logits_and_loss() -> None:
    m = tiny(vocab=300)
    x = torch.randint(0, 300, (2, 64))
    logits = m(x)
    assert logits.shape == (2, 64, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # softcap
    loss = m(x, x)
    assert abs(loss.item() - math.log(300)) < 0.05  # lm_head ~ N(0, 0.001): uniform predictions at init
    per_token = m(x, x, loss_reduction="none")
    assert per_token.shape == (128,) and torch.allclose(per_token.mean(), loss)
    # causal: changing the last token leaves earlier logits unchanged
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 300
    assert torch.equal(m(y)[:, :-1], logits[:, :-1])
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_init_is_seeded_and_nanochat_like() -> None:
    a, b = tiny(seed=3), tiny(seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    blk = a.transformer.h[0]
    assert (
        torch.count_nonzero(blk.attn.c_proj.weight) == 0 and torch.count_nonzero(blk.mlp.c_proj.weight) == 0
    )
    assert torch.allclose(a.resid_lambdas, torch.tensor([1.15, 1.05]))  # ramps over the layers
    assert torch.allclose(a.x0_lambdas, torch.tensor([0.20, 0.05]))
    assert a.smear_lambda.item() == 0 and a.backout_lambda.item() == pytest.approx(0.2)
    assert a.transformer.h[1].attn.ve_gate.weight.min() > 0 and a.transformer.h[1].attn.ve_gate.weight.max() < 0.02
    assert a.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert a.transformer.wte.weight.std().item() == pytest.approx(0.8, rel=0.05)


def test_sliding_window_limits_what_a_position_sees() -> None:
    """SSSL at T=512 on a depth-2 model: layer 0 sees 128 tokens back, the last layer all 512.
    After layer 0, a change of token 0 has reached positions up to 128 (directly) and 129 (through
    the smear into position 1), and no further; with the pattern L it reaches every position."""
    m = tiny(depth=2, vocab=300, seq=512)
    full = tiny(depth=2, vocab=300, seq=512, pattern="L")
    full.load_state_dict(m.state_dict())
    assert m.window_sizes == [128, 512] and full.window_sizes == [512, 512]
    with torch.no_grad():
        for p in m.parameters():  # zero-initialised projections would hide attention entirely
            p.add_(torch.randn_like(p) * 0.1)
        full.load_state_dict(m.state_dict())
    x = torch.randint(0, 300, (1, 512))
    h_win, h_full = {}, {}
    m.transformer.h[0].register_forward_hook(lambda mod, i, o: h_win.setdefault("0", o))
    full.transformer.h[0].register_forward_hook(lambda mod, i, o: h_full.setdefault("0", o))
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % 300
    m(x), full(x)
    first_win, first_full = h_win.pop("0"), h_full.pop("0")
    m(y), full(y)
    changed = [not torch.equal(h_win["0"][0, t], first_win[0, t]) for t in range(512)]
    assert all(changed[:130]) and not any(changed[130:])
    assert not torch.equal(h_full["0"][0, 300], first_full[0, 300])


def test_polar_express_orthogonalises() -> None:
    g = torch.randn(3, 64, 256)
    s = torch.linalg.svdvals(polar_express(g))
    assert s.min() > 0.5 and s.max() < 1.3  # near-orthogonal (Polar Express, not exact UV^T)
    tall = torch.linalg.svdvals(polar_express(torch.randn(2, 256, 64)))
    assert tall.min() > 0.5 and tall.max() < 1.3


def test_optimizer_groups_and_learning() -> None:
    m = tiny(vocab=64, seq=32)
    opt = build_optimizer(m, embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28)
    kinds = [g["kind"] for g in opt.param_groups]
    # AdamW: lm_head, wte, value embeds, resid, x0, smear/backout; one Muon group per matrix shape:
    # q/k/v/o (128, 128), c_fc (512, 128), c_proj (128, 512), ve_gate (1, 12)
    assert kinds.count("adamw") == 6 and kinds.count("muon") == 4
    dim_scale = (128 / 768) ** -0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.008 * dim_scale)
    assert opt.param_groups[0]["betas"] == (0.8, 0.96) and opt.param_groups[0]["weight_decay"] == 0.01
    assert opt.param_groups[2]["lr"] == pytest.approx(0.3 * dim_scale * 0.5)  # value embeddings: half
    assert opt.param_groups[5]["lr"] == 0.2  # smear/backout: fixed
    assert all(g["beta2"] == 0.9 for g in opt.param_groups if g["kind"] == "muon")
    # learns a fixed batch: a real step of the combined optimiser reduces the loss a lot
    torch.manual_seed(0)
    x = torch.randint(0, 64, (8, 32))
    first = None
    for _ in range(30):
        loss = m(x[:, :-1], x[:, 1:])
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        m.zero_grad(set_to_none=True)
    assert loss.item() < 0.6 * first


def test_schedules() -> None:
    n = 1000
    assert schedule.lr_multiplier(0, n, 40, 0.65, 0.05) == pytest.approx(1 / 40)  # warmup (it + 1) / 40
    assert schedule.lr_multiplier(39, n, 40, 0.65, 0.05) == 1.0
    assert schedule.lr_multiplier(350, n, 40, 0.65, 0.05) == 1.0  # warmdown starts at 1000 - 650
    assert schedule.lr_multiplier(675, n, 40, 0.65, 0.05) == pytest.approx(0.5 + 0.5 * 0.05)
    assert schedule.lr_multiplier(1000, n, 40, 0.65, 0.05) == pytest.approx(0.05)
    m = 2000  # warmdown from step 700
    assert schedule.muon_momentum(0, m, 0.65) == pytest.approx(0.85)
    assert schedule.muon_momentum(200, m, 0.65) == pytest.approx(0.91)
    assert schedule.muon_momentum(399, m, 0.65) < 0.97 and schedule.muon_momentum(400, m, 0.65) == pytest.approx(0.97)
    assert schedule.muon_momentum(1350, m, 0.65) == pytest.approx(0.935)
    assert schedule.muon_momentum(2000, m, 0.65) == pytest.approx(0.90)
    assert schedule.weight_decay(500, n, 0.2) == pytest.approx(0.1)  # cosine: half at half-way
    assert schedule.weight_decay(1000, n, 0.2) == pytest.approx(0.0)
