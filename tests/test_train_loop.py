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


@pytest.mark.e2e
def test_a_nan_loss_ends_the_run_diverged_without_a_nan_checkpoint(tmp_path) -> None:
    """Issue 20: a run whose loss became NaN trained every step, saved NaN checkpoints and ended
    `done`. Now the first non-finite loss (averaged over the 2 ranks, so both see it) ends it:
    exit 1 naming the step and the last finite loss, state `diverged` (status says so), the
    metrics stop at the last finite step, and the only checkpoint is the finite one before it.
    ARMLAB_TEST_NAN_STEP poisons a weight on every rank before step 10 (loss at step 10: NaN)."""
    from armlab import runs
    from armlab.train import checkpoint
    from train_util import ARM, armlab, build_workdir, run_dir, train_losses

    exp_file = build_workdir(tmp_path)
    r = armlab("train", str(exp_file), "--arm", ARM, "--device", "cpu", "--nproc", "2", "--num-iterations", "12",
               "--run-name", "nan", env={"ARMLAB_TEST_NAN_STEP": "10"})  # fmt: skip
    d = run_dir(exp_file, "nan")
    assert r.returncode == 1, r.stderr[-2000:]
    losses = train_losses(d)
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(
        f"armlab: failed: run 'nan' diverged at step 10: loss nan (last finite loss {losses[9]:.4f} at step 9); "
        "no checkpoint of the non-finite model was kept; lower the learning rates"
    ), line
    assert "armlab: diverged at step 10: loss nan" in r.stdout and "Traceback" not in r.stdout
    assert sorted(losses) == list(range(1, 10))  # no NaN record (metrics.jsonl stays strict JSON)
    state = runs.read_run_state(d)
    assert (state.state, state.step) == ("diverged", 10) and state.error.startswith("diverged at step 10: loss nan")
    assert checkpoint.list_steps(d) == [8]
    weights = torch.load(checkpoint.checkpoint_dir(d, 8) / "model.pt")
    assert all(torch.isfinite(w.float()).all() for w in weights.values())
    status = armlab("status", str(exp_file))
    assert any(ln.split()[:3] == [ARM, "nan", "diverged"] for ln in status.stdout.splitlines()), status.stdout
