"""Score one loaded model as an engine's `evaluate` asks (armlab.train.engines.EvalRequest): the
whole-document val bpb, nanochat's packed val bpb as a labelled second number, and CORE with
per-item continuous scores. Its own module so the engines can call it without importing the
per-run evaluation (armlab.evaluate.run), which calls the engines."""

from __future__ import annotations

from typing import Any

from armlab.evaluate.record import CheckpointEval


def evaluate_model(model: Any, request: Any) -> CheckpointEval:
    """Score one loaded model (in eval mode) as `request` (armlab.train.engines.EvalRequest) asks."""
    from armlab.evaluate.bpb import evaluate_bpb
    from armlab.evaluate.core import evaluate_core
    from armlab.evaluate.packed import evaluate_packed_bpb

    r, exp = request, request.exp
    shape = (exp.train.device_batch_size, exp.model.max_seq_len, r.device)
    whole = (
        evaluate_bpb(model, r.tokenizer, r.eval_dir, r.max_tokens, *shape, seed=exp.eval.seed)
        if r.bpb
        else None
    )
    packed = (
        evaluate_packed_bpb(model, r.tokenizer, r.eval_dir, r.max_tokens, *shape)
        if r.packed and r.bpb
        else None
    )
    core = (
        evaluate_core(
            model,
            r.tokenizer,
            r.bundle,
            device=r.device,
            max_per_task=r.max_per_task,
            max_len=exp.model.max_seq_len,
        )  # fmt: skip
        if r.bundle
        else None
    )
    return CheckpointEval(whole, packed, core)
