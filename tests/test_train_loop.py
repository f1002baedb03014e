"""The GPU branch of the training step, exercised on CPU: bf16 compute dtype (embeddings in bf16,
Linear layers casting their fp32 weights, no autocast), the model and both optimiser steps
torch.compile'd, as `train_loop` runs them on CUDA. Compilation takes about a minute on 2 cores."""

from __future__ import annotations

import pytest
import torch

from armlab.spec import TrainSpec
from armlab.train import recipe
from armlab.train.loop import Dist, Schedule, train_step
from armlab.train.model import GPTConfig, build_model
from armlab.train.optim import build_optimizer

CFG = GPTConfig(depth=1, vocab_size=256, seq_len=32, aspect_ratio=64, head_dim=64)
LRS = dict(embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1)


def run(compiled: bool, steps: int) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model(CFG, "cpu", torch.bfloat16)
    opt = build_optimizer(model, **LRS, compile=compiled)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    x = torch.randint(0, CFG.vocab_size, (4, CFG.seq_len + 1), generator=torch.Generator().manual_seed(1))
    batches = iter(lambda: (x[:, :-1], x[:, 1:]), None)  # one fixed batch: the loss must fall fast
    sched = Schedule(10, 2, recipe.resolve(TrainSpec(warmup_steps=0)), LRS["weight_decay"])
    d = Dist(0, 1, torch.device("cpu"))
    return [train_step(fwd, model, opt, batches, s, sched, d)[0] for s in range(steps)], model


@pytest.mark.e2e
def test_bf16_compiled_training_step_on_cpu() -> None:
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, model = run(compiled=True, steps=4)
    assert counters["stats"]["unique_graphs"] >= 3  # the model and the AdamW and Muon steps were compiled
    assert (
        model.transformer.wte.weight.dtype == torch.bfloat16
        and model.value_embeds["0"].weight.dtype == torch.bfloat16
    )
    assert (
        model.lm_head.weight.dtype == torch.float32
        and model.transformer.h[0].attn.c_q.weight.dtype == torch.float32
    )
    assert all(torch.isfinite(torch.tensor(compiled))) and compiled[-1] < 0.6 * compiled[0]
    eager, _ = run(compiled=False, steps=4)
    # same weights, same data: compiled and eager bf16 agree to bf16 rounding
    assert compiled[0] == pytest.approx(eager[0], rel=1e-2)
    assert compiled == pytest.approx(eager, rel=0.1)
