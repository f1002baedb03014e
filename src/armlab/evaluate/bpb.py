"""Bits per byte on the shared eval set: the same tokens for every arm, any number of ranks.

nanochat evaluates each run on the last shard of *its own* data dir, so two arms are scored on
different text. Here every arm is scored on the experiment's held-out `<workdir>/eval/` set,
packed the way training packs (BOS-aligned best-fit rows of T+1 tokens) but in file order, not
shuffled, and cut at the first `max_tokens // T` rows: a fixed token sequence given the
tokenizer and T. Rows are dealt to ranks (row i -> rank i % W) and the sums all-reduced, so the
result does not depend on the world size.

bpb = sum of target-token losses (nats) / (ln 2 * sum of target-token UTF-8 bytes), where
special tokens (BOS) count neither nats nor bytes: a tokenizer-independent measure, comparable
even across vocabulary sizes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.train.loader import DataLoader, list_units, units_fingerprint


def _pack_eval_rows(eval_dir: Path, tokenizer: Any, rows: int, seq_len: int, warn: bool) -> np.ndarray:
    """The first `rows` rows (rows, T+1) of the eval set packed in file order, one pass, no shuffle."""
    loader = DataLoader(eval_dir, tokenizer, 1, seq_len, shuffle=False, epochs=1, prefetch=0)
    out = np.empty((rows, seq_len + 1), dtype=np.int32)
    n = 0
    for x, y in loader:
        out[n, :-1], out[n, -1] = x[0].numpy(), y[0, -1].item()
        n += 1
        if n == rows:
            break
    if n < rows and warn:
        console.print(
            f"[yellow]eval: {eval_dir} holds only {n * seq_len:,} tokens of the {rows * seq_len:,} requested; "
            "using them all (raise eval.docs to get more)[/]"
        )
    return out[:n]


_CACHE: dict[tuple[Any, ...], np.ndarray] = {}  # the packed eval rows, built once per process


def eval_rows(
    eval_dir: str | Path, tokenizer: Any, max_tokens: int, seq_len: int, warn: bool = True
) -> np.ndarray:
    """The fixed eval token rows (R, T+1) for this tokenizer and T; every row starts with BOS."""
    eval_dir = Path(eval_dir).resolve()
    rows = max_tokens // seq_len
    if rows < 1:
        raise ArmlabError(
            f"eval: max_tokens ({max_tokens}) must be >= seq_len ({seq_len}) (train.eval_tokens)"
        )
    files, units = list_units(eval_dir)
    key = (str(eval_dir), units_fingerprint(files, units), tokenizer.fingerprint, rows, seq_len)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = _pack_eval_rows(eval_dir, tokenizer, rows, seq_len, warn)
    return _CACHE[key]


@torch.no_grad()
def evaluate_bpb(
    model: Any,
    tokenizer: Any,
    eval_dir: str | Path,
    max_tokens: int,
    batch_size: int,
    seq_len: int,
    device: str | torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Bits per byte of `model` (x -> logits (B, T, V)) on the first max_tokens eval tokens.

    Call it under the same autocast context as training, with the model in eval mode. Every rank
    runs the same number of forward calls (a rank with fewer rows repeats row 0 with weight 0),
    so a model wrapped in DDP cannot deadlock on buffer broadcasts.
    """
    rows = eval_rows(eval_dir, tokenizer, max_tokens, seq_len, warn=rank == 0)  # one warning, not one a rank
    if len(rows) == 0:
        raise ArmlabError(f"eval: {eval_dir} holds too little text for one row of {seq_len} tokens")
    mine = np.arange(rank, len(rows), world_size)
    per_rank = math.ceil(len(rows) / world_size)
    steps = math.ceil(per_rank / batch_size)
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64, device=device)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    for s in range(steps):
        idx = mine[s * batch_size : (s + 1) * batch_size]
        weight = torch.ones(batch_size, dtype=torch.float64, device=device)
        if len(idx) < batch_size:  # pad with row 0, counted with weight 0 (same call count on every rank)
            weight[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), dtype=np.int64)])
        batch = torch.from_numpy(rows[idx].astype(np.int64)).to(device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        for b in range(batch_size):  # one row at a time keeps the fp32 log-softmax copy small
            loss = F.cross_entropy(logits[b].float(), y[b], reduction="none").double()
            b_bytes = token_bytes[y[b]]
            counted = (b_bytes > 0).double() * weight[b]
            nats += (loss * counted).sum()
            nbytes += (b_bytes.double() * counted).sum()
    if world_size > 1:
        import torch.distributed as dist

        total = torch.stack([nats, nbytes])
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        nats, nbytes = total[0], total[1]
    return float(nats / (math.log(2) * nbytes))
