"""The model, optimiser and schedules, in-process (fast): sizes, recipe details, learning."""

from __future__ import annotations

import math

import pytest
import torch

from armlab.budget import param_counts
from armlab.spec import ModelSpec
from armlab.train import schedule
from armlab.train.model import GPT, GPTConfig
from armlab.train.optim import build_optimizer, polar_express


def tiny(depth: int = 2, vocab: int = 300, seq: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(GPTConfig(depth=depth, vocab_size=vocab, seq_len=seq))
    m.init_weights()
    return m


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
    per_token = m(x, x, reduction="none")
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
    assert torch.allclose(a.x0_lambdas, torch.full((2,), 0.1)) and torch.all(a.resid_lambdas == 1)
    assert a.lm_head.weight.std().item() == pytest.approx(0.001, rel=0.05)


def test_polar_express_orthogonalises() -> None:
    g = torch.randn(3, 64, 256)
    s = torch.linalg.svdvals(polar_express(g))
    assert s.min() > 0.5 and s.max() < 1.3  # near-orthogonal (Polar Express, not exact UV^T)
    tall = torch.linalg.svdvals(polar_express(torch.randn(2, 256, 64)))
    assert tall.min() > 0.5 and tall.max() < 1.3


def test_optimizer_groups_and_learning() -> None:
    m = tiny(vocab=64, seq=32)
    opt = build_optimizer(
        m, embedding_lr=0.3, unembedding_lr=0.004, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.2
    )
    kinds = [g["kind"] for g in opt.param_groups]
    # one Muon group per matrix shape: q/k/v/o (128, 128), c_fc (512, 128), c_proj (128, 512), ve_gate (1, 12)
    assert kinds.count("adamw") == 5 and kinds.count("muon") == 4
    dim_scale = (128 / 768) ** -0.5
    assert opt.param_groups[0]["lr"] == pytest.approx(0.004 * dim_scale)
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
    n = 100
    assert schedule.lr_multiplier(0, n, 0.0, 0.4, 0.0) == 1.0
    assert schedule.lr_multiplier(60, n, 0.0, 0.4, 0.0) == 1.0
    assert schedule.lr_multiplier(80, n, 0.0, 0.4, 0.0) == pytest.approx(0.5)
    assert schedule.lr_multiplier(100, n, 0.0, 0.4, 0.1) == pytest.approx(0.1)
    assert schedule.lr_multiplier(4, n, 0.1, 0.4, 0.0) == pytest.approx(0.5)  # warmup (it + 1) / 10
    assert schedule.muon_momentum(0) == pytest.approx(0.85)
    assert schedule.muon_momentum(150) == pytest.approx(0.90)
    assert schedule.muon_momentum(10_000) == pytest.approx(0.95)
    assert schedule.weight_decay(50, n, 0.2) == pytest.approx(0.1)
    s = schedule.scaling(depth=24, total_batch_size=2**20, weight_decay_base=0.2)
    assert s.weight_decay == pytest.approx(0.05) and s.batch_lr_scale == pytest.approx(2**0.5)
