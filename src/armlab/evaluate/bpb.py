"""Bits per byte on the shared eval set: the same tokens for every arm, any number of ranks.

The definition is nanochat's (92d63d4, nanochat/loss_eval.py evaluate_bpb): bpb = sum of
target-token losses (nats) / (ln 2 * sum of target-token UTF-8 bytes), where special tokens
(BOS) count neither nats nor bytes; a tokenizer-independent measure, comparable even across
vocabulary sizes. The model is called as nanochat's is, `model(x, y, loss_reduction="none")`.

The token stream is built the way nanochat builds its val stream (BOS-aligned best-fit rows of
T+1 tokens from a 1000-document buffer refilled 128 documents at a time, in file and row-group
order), with three differences, all so that every arm and seed is scored on the same tokens:
1. the documents are the experiment's held-out `<workdir>/eval/` set, not the last shard of
   each run's own data dir (nanochat scores two arms on different text);
2. the stream is one pass over the set and ends when the buffer can no longer fill a row
   (nanochat's loops forever, so its last rows would mix in documents from a second pass);
3. rows are dealt to ranks round-robin (row i -> rank i % W) and the sums all-reduced, so the
   result does not depend on the world size (nanochat strides row groups by rank).
`max_tokens` cuts the stream at its first `max_tokens // T` rows (in-training evals use
`train.eval_tokens`); None scores the whole set (`armlab evaluate`'s default).

Besides the total, every result carries per-document sums in eval-set document order (the
nats and bytes of the scored tokens of each document; 0 and 0 for a document whose tokens were
all cropped or beyond the cut), for confidence intervals over documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.train.loader import DataLoader
from armlab.train.units import list_units, units_fingerprint


@dataclass(frozen=True)
class EvalSet:
    """The eval set packed once: rows (R, T+1) of token ids and the eval-set index of each token's document."""

    tokens: np.ndarray
    docs: np.ndarray
    n_docs: int


_CACHE: dict[tuple[Any, ...], EvalSet] = {}  # the packed eval set, built once per process


def eval_set(eval_dir: str | Path, tokenizer: Any, seq_len: int) -> EvalSet:
    """The whole eval set packed into rows of seq_len + 1 tokens (every row starts with BOS)."""
    eval_dir = Path(eval_dir).resolve()
    files, units = list_units(eval_dir)
    key = (str(eval_dir), units_fingerprint(files, units), tokenizer.fingerprint, seq_len)
    if key not in _CACHE:
        _CACHE.clear()
        loader = DataLoader(eval_dir, tokenizer, 1, seq_len, shuffle=False, epochs=1, prefetch=0)
        tokens, docs = loader.pack_rows()
        _CACHE[key] = EvalSet(tokens, docs, sum(u.rows for u in units))
    return _CACHE[key]


def eval_rows(
    eval_dir: str | Path, tokenizer: Any, max_tokens: int | None, seq_len: int, warn: bool = True
) -> np.ndarray:
    """The eval token rows (R, T+1) scored for this budget (None: all of them)."""
    return _cut(eval_set(eval_dir, tokenizer, seq_len), eval_dir, max_tokens, seq_len, warn).tokens


def _cut(es: EvalSet, eval_dir: Any, max_tokens: int | None, seq_len: int, warn: bool) -> EvalSet:
    if max_tokens is None:
        return es
    rows = max_tokens // seq_len
    if rows < 1:
        raise ArmlabError(
            f"eval: max_tokens ({max_tokens}) must be >= seq_len ({seq_len}) (train.eval_tokens / --max-tokens)"
        )
    if len(es.tokens) < rows and warn:
        console.print(
            f"[yellow]eval: {eval_dir} holds only {len(es.tokens) * seq_len:,} tokens of the "
            f"{rows * seq_len:,} requested; using them all (raise eval.docs to get more)[/]"
        )
    return EvalSet(es.tokens[:rows], es.docs[:rows], es.n_docs)


@dataclass(frozen=True)
class BpbResult:
    bpb: float
    tokens: int  # target tokens scored (those with bytes: BOS targets are not)
    docs: int  # documents with at least one scored token
    per_doc_nats: list[float]  # eval-set document order
    per_doc_bytes: list[int]

    def eval_json(self) -> dict[str, Any]:
        """The bpb fields of eval.json."""
        return {
            "val_bpb": self.bpb,
            "val_bpb_tokens": self.tokens,
            "val_bpb_docs": self.docs,
            "val_bpb_per_doc": {"nats": self.per_doc_nats, "bytes": self.per_doc_bytes},
        }


@torch.no_grad()
def evaluate_bpb(
    model: Any,
    tokenizer: Any,
    eval_dir: str | Path,
    max_tokens: int | None,
    batch_size: int,
    seq_len: int,
    device: str | torch.device,
    rank: int = 0,
    world_size: int = 1,
) -> BpbResult:
    """Bits per byte of `model` on the eval set (its first max_tokens tokens; None: all of it).

    `model(x, y, loss_reduction="none")` returns the per-token losses. Call it with the model in
    eval mode. Every rank runs the same number of forward calls of one shape (a rank with fewer
    rows repeats row 0 with weight 0), so a model wrapped in DDP cannot deadlock on buffer
    broadcasts and a compiled one never recompiles for a short last batch.
    """
    es = _cut(eval_set(eval_dir, tokenizer, seq_len), eval_dir, max_tokens, seq_len, warn=rank == 0)
    if len(es.tokens) == 0:
        raise ArmlabError(f"eval: {eval_dir} holds too little text for one row of {seq_len} tokens")
    mine = np.arange(rank, len(es.tokens), world_size)
    steps = math.ceil(math.ceil(len(es.tokens) / world_size) / batch_size)
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64, device=device)
    doc_nats = torch.zeros(es.n_docs, dtype=torch.float64, device=device)
    doc_bytes = torch.zeros(es.n_docs, dtype=torch.float64, device=device)
    for s in range(steps):
        idx = mine[s * batch_size : (s + 1) * batch_size]
        weight = torch.ones(batch_size, 1, dtype=torch.float64, device=device)
        if len(idx) < batch_size:  # pad with row 0, counted with weight 0 (same calls on every rank)
            weight[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), dtype=np.int64)])
        batch = torch.from_numpy(es.tokens[idx].astype(np.int64)).to(device)
        owners = torch.from_numpy(es.docs[idx, 1:].astype(np.int64)).to(device).reshape(-1)
        x, y = batch[:, :-1], batch[:, 1:]
        loss = model(x, y, loss_reduction="none").view(batch_size, seq_len).double()
        nbytes = token_bytes[y]
        counted = (nbytes > 0).double() * weight  # BOS targets (0 bytes) and padding drop out
        doc_nats.index_add_(0, owners, (loss * counted).reshape(-1))
        doc_bytes.index_add_(0, owners, (nbytes.double() * counted).reshape(-1))
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(doc_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(doc_bytes, op=dist.ReduceOp.SUM)
    y_all = es.tokens[:, 1:]
    n_tokens = int((tokenizer.token_bytes[y_all] > 0).sum())
    nats, nbytes = float(doc_nats.sum()), float(doc_bytes.sum())
    per_bytes = doc_bytes.round().long().cpu()
    return BpbResult(
        bpb=nats / (math.log(2) * nbytes) if nbytes else float("inf"),
        tokens=n_tokens,
        docs=int((per_bytes > 0).sum()),
        per_doc_nats=doc_nats.cpu().tolist(),
        per_doc_bytes=per_bytes.tolist(),
    )
