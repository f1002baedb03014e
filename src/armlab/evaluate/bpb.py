"""Val bits per byte over every byte of the eval set: each document scored whole, on its own.

The definition is nanochat's (92d63d4, nanochat/loss_eval.py evaluate_bpb): bpb = sum of
target-token losses (nats) / (ln 2 * sum of target-token UTF-8 bytes), where special tokens (BOS)
count neither nats nor bytes; a tokenizer-independent measure, comparable across vocabularies. The
model is called as nanochat's is, `model(x, y, loss_reduction="none")`.

What is scored differs from nanochat's val stream (kept as a second number, armlab.evaluate.packed):
that stream packs documents into rows and crops whichever does not fit, so it scores only part of
the eval set (about 40% of the demo's bytes; issue 19 found junk documents under-weighted 13% vs
32% of the documents), and which part depends on the packing. Here:

- **Every document, whole, on its own.** A document is the only text in its rows (BOS first, as
  every training row starts), so its score depends on the model and the document only: not on
  its neighbours, the packing, the sample it belongs to or the number of ranks. The in-training
  curves (a fixed sample of whole documents, `docs.sample_docs`) and the final eval therefore score
  each document identically, and the per-document sums in eval.json cover 100% of the bytes.
- **Documents longer than the context: sliding windows.** The first window is the document's
  first T+1 tokens (all its targets scored, as in training). Each later window is BOS followed by
  up to T tokens of the document, and scores only its targets that have at least K = T/2 tokens of
  their own document before them in the window; windows advance by T - K, so every token is scored
  exactly once, with at least K tokens of context (the strided evaluation of fixed-length models in
  Press et al. 2021, "Shortformer", and the HF perplexity guide). Why not non-overlapping chunks:
  each chunk's first tokens would be predicted from BOS alone, so a document's score would depend on
  where the chunks fall and long documents would look worse than they are. The cost: long
  documents' tails are run twice (T / (T - K) = 2x); at nanochat's T = 2048 most documents fit.
- **Batches of similar lengths.** Rows are sorted by length and cut into forward calls of at most
  `batch_size * T` tokens, widths rounded up to a multiple of 64 (few shapes), padding after the
  scored tokens (attention is causal: padding never changes a score) and weighted 0.
- **Any number of ranks.** The calls are planned once for all ranks (the same windows, the same
  batches on every world size), call i runs on rank i % W, and the per-document float64 sums are
  all-reduced: the result does not depend on W.

`max_tokens` (the in-training evals' `train.eval_tokens`, `armlab evaluate --max-tokens`) scores the
fixed seeded sample of whole documents whose targets reach that budget; None scores them all.
Every result carries per-document sums in eval-set order (0 and 0 where a document was not sampled).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from armlab.errors import ArmlabError
from armlab.evaluate.docs import EvalDocs, eval_docs, sample_docs
from armlab.evaluate.record import WHOLE_DOCS, BpbMethod, BpbResult
from armlab.progress import console, progress

WIDTH_STEP = 64  # forward-call widths are multiples of this (or T): a handful of shapes


def min_context(seq_len: int) -> int:
    """K: the least context (tokens of its own document) a token of a long document is scored with."""
    return max(1, seq_len // 2)


def doc_windows(length: int, seq_len: int, k: int) -> list[tuple[int, int, int]]:
    """The windows of a document of `length` tokens (its BOS first), as (start, end, first): the
    window's tokens are doc[start:end], after a BOS when start > 0, and its targets from index
    `first` on are scored. Every target (doc[1:]) is scored exactly once."""
    if length <= seq_len + 1:
        return [(0, length, 0)]
    out = [(0, seq_len + 1, 0)]
    j = seq_len + 1  # the first target not scored yet
    while j < length:
        start = j - k
        end = min(start + seq_len, length)
        out.append((start, end, k))  # targets doc[start:end] (after BOS); doc[j] is target k
        j = end
    return out


@dataclass(frozen=True)
class Plan:
    """The rows (windows) of the scored documents and the forward calls that run them."""

    rows: list[np.ndarray]  # int64 token ids, BOS first, <= T+1 each
    first: np.ndarray  # per row: index of its first scored target
    owner: np.ndarray  # per row: eval-set index of its document
    calls: list[np.ndarray]  # row indices per forward call (similar lengths)
    widths: list[int]  # input width of each call
    docs: np.ndarray  # the scored documents (eval-set indices, ascending)
    tokens: int  # scored targets with bytes
    eval_bytes: int


_PLANS: dict[tuple[Any, ...], Plan] = {}


def plan(docs: EvalDocs, chosen: np.ndarray, token_bytes: np.ndarray, bos: int, seq_len: int, k: int,
         batch_tokens: int) -> Plan:  # fmt: skip
    """Cut the chosen documents into windows and the windows into forward calls (see the module doc)."""
    rows, first, owner = [], [], []
    tokens = 0
    for d in chosen:
        doc = docs.doc(int(d)).astype(np.int64)
        for start, end, f in doc_windows(len(doc), seq_len, k):
            row = doc[start:end] if start == 0 else np.concatenate([[bos], doc[start:end]])
            rows.append(row)
            first.append(f)
            owner.append(int(d))
            tokens += int((token_bytes[row[1 + f :]] > 0).sum())
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r]))
    calls: list[np.ndarray] = []
    widths: list[int] = []
    at = 0
    while at < len(order):
        width = min(seq_len, -(-(len(rows[order[at]]) - 1) // WIDTH_STEP) * WIDTH_STEP)
        n = max(1, batch_tokens // width)
        calls.append(np.asarray(order[at : at + n]))
        widths.append(width)
        at += n
    return Plan(rows, np.asarray(first), np.asarray(owner), calls, widths, chosen, tokens,
                int(docs.text_bytes.sum()))  # fmt: skip


_WARNED: set[tuple[str, int]] = set()


def _warn_small(docs: EvalDocs, eval_dir: Any, max_tokens: int | None) -> None:
    """Once per process (= once per training run): the eval set is smaller than the budget."""
    held = int((docs.lengths - 1).sum())
    if max_tokens is None or held >= max_tokens or (str(eval_dir), max_tokens) in _WARNED:
        return
    _WARNED.add((str(eval_dir), max_tokens))
    console.print(
        f"[yellow]eval: {eval_dir} holds {held:,} tokens, fewer than the {max_tokens:,} asked for "
        "(train.eval_tokens / --max-tokens); every document is scored (raise eval.docs for more)[/]"
    )


def eval_plan(eval_dir: str | Path, tokenizer: Any, max_tokens: int | None, seq_len: int, batch_tokens: int,
              seed: int = 0, warn: bool = True) -> Plan:  # fmt: skip
    """The (cached) plan for this eval set, budget and shape."""
    docs = eval_docs(eval_dir, tokenizer)
    if warn:
        _warn_small(docs, eval_dir, max_tokens)
    key = (docs.fingerprint, tokenizer.fingerprint, max_tokens, seq_len, batch_tokens, seed)
    if key not in _PLANS:
        _PLANS.clear()
        chosen = sample_docs(docs, max_tokens, seed)
        _PLANS[key] = plan(docs, chosen, tokenizer.token_bytes, tokenizer.bos_id, seq_len, min_context(seq_len),
                           batch_tokens)  # fmt: skip
    return _PLANS[key]


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
    seed: int = 0,
) -> BpbResult:
    """Bits per byte of `model` over whole documents of the eval set (all of them, or the seeded
    sample whose targets reach `max_tokens`; `seed` is the experiment's eval.seed).

    `model(x, y, loss_reduction="none")` returns the per-token losses; call it in eval mode, with
    the eager model (calls have several widths). Rank 0 shows progress (tokens, rate, ETA).
    """
    p = eval_plan(eval_dir, tokenizer, max_tokens, seq_len, batch_size * seq_len, seed, warn=rank == 0)
    n_docs = len(eval_docs(eval_dir, tokenizer).text_bytes)
    token_bytes = torch.as_tensor(tokenizer.token_bytes, dtype=torch.int64, device=device)
    doc_nats = torch.zeros(n_docs, dtype=torch.float64, device=device)
    doc_bytes = torch.zeros(n_docs, dtype=torch.float64, device=device)
    mine = range(rank, len(p.calls), world_size)
    with progress(transient=True) if rank == 0 else contextlib.nullcontext() as bar:
        total = sum(len(p.calls[c]) * p.widths[c] for c in mine)
        job = bar.add_task(f"val bpb ({len(p.docs):,} docs)", total=total, unit="tok") if bar else None
        for c in mine:
            idx, width = p.calls[c], p.widths[c]
            x = torch.full((len(idx), width + 1), tokenizer.bos_id, dtype=torch.int64)
            scored = torch.zeros(len(idx), width, dtype=torch.bool)
            for i, r in enumerate(idx):
                row = p.rows[r]
                x[i, : len(row)] = torch.from_numpy(row)
                scored[i, p.first[r] : len(row) - 1] = True
            x, scored = x.to(device), scored.to(device)
            inputs, targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()  # nanochat views targets
            loss = model(inputs, targets, loss_reduction="none").view(len(idx), width).double()
            nbytes = token_bytes[targets] * scored
            counted = (nbytes > 0).double()  # BOS targets (0 bytes), unscored context and padding drop out
            owners = torch.from_numpy(p.owner[idx]).to(device)
            doc_nats.index_add_(0, owners, (loss * counted).sum(1))
            doc_bytes.index_add_(0, owners, nbytes.double().sum(1))
            if bar:
                bar.advance(job, len(idx) * width)
    return finish(doc_nats, doc_bytes, p.tokens, BpbMethod(WHOLE_DOCS, seq_len, min_context(seq_len)), p.eval_bytes,
                  world_size)  # fmt: skip


def finish(
    doc_nats: torch.Tensor,
    doc_bytes: torch.Tensor,
    n_tokens: int,
    method: BpbMethod,
    eval_bytes: int,
    world_size: int,
) -> BpbResult:
    """All-reduce the per-document sums over ranks (float64) and make the result."""
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(doc_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(doc_bytes, op=dist.ReduceOp.SUM)
    nats, nbytes = float(doc_nats.sum()), float(doc_bytes.sum())
    per_bytes = doc_bytes.round().long().cpu()
    if not nbytes:
        raise ArmlabError(
            "eval: no eval-set bytes were scored (an empty eval set?); rerun `armlab prepare EXP`"
        )
    return BpbResult(
        method=method,
        bpb=nats / (math.log(2) * nbytes),
        tokens=n_tokens,
        docs=int((per_bytes > 0).sum()),
        bytes=int(per_bytes.sum()),
        eval_bytes=eval_bytes,
        per_doc_nats=doc_nats.cpu().tolist(),
        per_doc_bytes=per_bytes.tolist(),
    )
