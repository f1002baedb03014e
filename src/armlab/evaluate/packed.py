"""nanochat's packed val stream over the shared eval set: the second, labelled val bpb number.

nanochat (92d63d4, nanochat/loss_eval.py evaluate_bpb on its BOS-aligned best-fit val loader)
scores rows of T+1 tokens packed from a 1000-document buffer refilled 128 documents at a time;
when no buffered document fits the rest of a row, the shortest is cropped and its remainder
dropped. So the stream scores only part of the eval set (on the demo about 40% of its bytes, and
long documents mostly by their beginnings), which is why armlab's headline val bpb scores every
document whole (`armlab.evaluate.bpb`) and keeps this one beside it, labelled, with its coverage.

The stream here is nanochat's val stream with three differences, all so that every arm and seed
is scored on the same tokens (tests/test_train_parity.py checks the rows and the value):
1. the documents are the experiment's held-out `<workdir>/eval/` set, not the last shard of
   each run's own data dir (nanochat scores two arms on different text);
2. the stream is one pass over the set and ends when the buffer can no longer fill a row
   (nanochat's loops forever, so its last rows would mix in documents from a second pass);
3. rows are dealt to ranks round-robin (row i -> rank i % W) and the sums all-reduced, so the
   result does not depend on the world size (nanochat strides row groups by rank).
`max_tokens` cuts the stream at its first `max_tokens // T` rows; None packs the whole set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from armlab.errors import ArmlabError
from armlab.evaluate.bpb import finish
from armlab.evaluate.docs import eval_docs
from armlab.evaluate.record import PACKED, BpbMethod, BpbResult
from armlab.train.loader import DataLoader
from armlab.train.units import list_units, units_fingerprint


@dataclass(frozen=True)
class PackedSet:
    """The eval set packed once: rows (R, T+1) of token ids and the eval-set index of each token's document."""

    tokens: np.ndarray
    docs: np.ndarray
    n_docs: int


_CACHE: dict[tuple[Any, ...], PackedSet] = {}  # the packed eval set, built once per process


def packed_set(eval_dir: str | Path, tokenizer: Any, seq_len: int) -> PackedSet:
    """The whole eval set packed into rows of seq_len + 1 tokens (every row starts with BOS)."""
    eval_dir = Path(eval_dir).resolve()
    files, units = list_units(eval_dir)
    key = (str(eval_dir), units_fingerprint(files, units), tokenizer.fingerprint, seq_len)
    if key not in _CACHE:
        _CACHE.clear()
        loader = DataLoader(eval_dir, tokenizer, 1, seq_len, shuffle=False, epochs=1, prefetch=0)
        tokens, docs = loader.pack_rows()
        _CACHE[key] = PackedSet(tokens, docs, sum(u.rows for u in units))
    return _CACHE[key]


def packed_rows(eval_dir: str | Path, tokenizer: Any, max_tokens: int | None, seq_len: int) -> PackedSet:
    """The packed rows scored for this budget (None: all of them)."""
    ps = packed_set(eval_dir, tokenizer, seq_len)
    if max_tokens is None:
        return ps
    rows = max_tokens // seq_len
    if rows < 1:
        raise ArmlabError(f"eval: max_tokens ({max_tokens}) must be >= seq_len ({seq_len}) (--max-tokens)")
    return PackedSet(ps.tokens[:rows], ps.docs[:rows], ps.n_docs)


@torch.no_grad()
def evaluate_packed_bpb(
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
    """Bits per byte of `model` on nanochat's packed stream of the eval set.

    `model(x, y, loss_reduction="none")` returns the per-token losses. Call it with the model in
    eval mode. Every rank runs the same number of forward calls of one shape (a rank with fewer
    rows repeats row 0 with weight 0), so a model wrapped in DDP cannot deadlock on buffer
    broadcasts and a compiled one never recompiles for a short last batch.
    """
    ps = packed_rows(eval_dir, tokenizer, max_tokens, seq_len)
    if len(ps.tokens) == 0:
        raise ArmlabError(f"eval: {eval_dir} holds too little text for one row of {seq_len} tokens")
    mine = np.arange(rank, len(ps.tokens), world_size)
    steps = math.ceil(math.ceil(len(ps.tokens) / world_size) / batch_size)
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64, device=device)
    doc_nats = torch.zeros(ps.n_docs, dtype=torch.float64, device=device)
    doc_bytes = torch.zeros(ps.n_docs, dtype=torch.float64, device=device)
    for s in range(steps):
        idx = mine[s * batch_size : (s + 1) * batch_size]
        weight = torch.ones(batch_size, 1, dtype=torch.float64, device=device)
        if len(idx) < batch_size:  # pad with row 0, counted with weight 0 (same calls on every rank)
            weight[len(idx) :] = 0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), dtype=np.int64)])
        batch = torch.from_numpy(ps.tokens[idx].astype(np.int64)).to(device)
        owners = torch.from_numpy(ps.docs[idx, 1:].astype(np.int64)).to(device).reshape(-1)
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # nanochat views targets
        loss = model(x, y, loss_reduction="none").view(batch_size, seq_len).double()
        nbytes = token_bytes[y]
        counted = (nbytes > 0).double() * weight  # BOS targets (0 bytes) and padding drop out
        doc_nats.index_add_(0, owners, (loss * counted).reshape(-1))
        doc_bytes.index_add_(0, owners, (nbytes.double() * counted).reshape(-1))
    y_all = ps.tokens[:, 1:]
    n_tokens = int((tokenizer.token_bytes[y_all] > 0).sum())
    return finish(
        doc_nats, doc_bytes, n_tokens, BpbMethod(PACKED, seq_len), int(eval_docs(eval_dir, tokenizer).text_bytes.sum()),
        world_size,
    )  # fmt: skip
