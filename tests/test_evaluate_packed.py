"""nanochat's packed val stream (the second val bpb number), with small real torch models whose bpb is
computed by hand. The headline (whole documents) is tests/test_evaluate_bpb.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from armlab.errors import ArmlabError
from armlab.evaluate import packed
from armlab.evaluate.packed import evaluate_packed_bpb, packed_rows
from armlab.tokenizer import Tokenizer
from tok_util import corpus, trained_tokenizer, write_shards

SEQ = 32


class Bigram(nn.Module):
    """logits of the next token = a table row of the current token (zeros: the uniform model).
    Called like nanochat's GPT: model(x, y, loss_reduction="none") -> per-token losses."""

    def __init__(self, vocab: int, zero: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(vocab, vocab)
        if zero:
            nn.init.zeros_(self.table.weight)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, loss_reduction: str = "mean") -> torch.Tensor:
        logits = self.table(idx)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=loss_reduction)


def reference_bpb(model: Bigram, tok: Tokenizer, rows: np.ndarray) -> float:
    """The definition, token by token: sum of -log p(target) over targets with bytes, / (ln 2 * bytes)."""
    nats, nbytes = reference_sums(model, tok, rows)
    return nats / (math.log(2) * nbytes)


def reference_sums(model: Bigram, tok: Tokenizer, rows: np.ndarray) -> tuple[float, float]:
    table = model.table.weight.detach().double().numpy()
    logp = (
        table
        - np.log(np.exp(table - table.max(1, keepdims=True)).sum(1, keepdims=True))
        - table.max(1, keepdims=True)
    )
    nats = nbytes = 0.0
    for row in rows:
        for cur, nxt in zip(row[:-1], row[1:], strict=True):
            if tok.token_bytes[nxt] > 0:
                nats -= logp[cur, nxt]
                nbytes += tok.token_bytes[nxt]
    return nats, nbytes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpb")
    tok = trained_tokenizer(root)
    eval_dir = write_shards(root / "eval", corpus(80, seed=1), files=3, row_group_rows=16)
    return tok, eval_dir


def test_uniform_model_scores_log2_vocab_per_token(setup):
    tok, eval_dir = setup
    rows = packed_rows(eval_dir, tok, max_tokens=20 * SEQ, seq_len=SEQ).tokens
    assert rows.shape == (20, SEQ + 1) and (rows[:, 0] == tok.bos_id).all()
    targets = rows[:, 1:]
    counted = tok.token_bytes[targets] > 0
    by_hand = math.log2(tok.vocab_size) * counted.sum() / tok.token_bytes[targets].sum()
    got = evaluate_packed_bpb(Bigram(tok.vocab_size, zero=True), tok, eval_dir, 20 * SEQ, 3, SEQ, "cpu").bpb
    assert got == pytest.approx(by_hand, rel=1e-6)  # float32 logits
    assert (~counted).any()  # BOS targets occur and are excluded from both sums


def test_bigram_model_matches_the_definition(setup):
    tok, eval_dir = setup
    model = Bigram(tok.vocab_size)
    got = evaluate_packed_bpb(model, tok, eval_dir, max_tokens=13 * SEQ + 5, batch_size=4, seq_len=SEQ, device="cpu").bpb
    rows = packed_rows(eval_dir, tok, 13 * SEQ, SEQ).tokens
    assert len(rows) == 13
    assert got == pytest.approx(reference_bpb(model, tok, rows), rel=1e-6)  # float32 logits
    # batch size is only a memory knob: same tokens, same answer
    assert evaluate_packed_bpb(model, tok, eval_dir, 13 * SEQ, 13, SEQ, "cpu").bpb == pytest.approx(got, rel=1e-12)


def test_eval_tokens_are_fixed_and_unshuffled(setup):
    tok, eval_dir = setup
    first = packed_rows(eval_dir, tok, 10 * SEQ, SEQ).tokens.copy()
    packed._CACHE.clear()
    assert np.array_equal(packed_rows(eval_dir, tok, 10 * SEQ, SEQ).tokens, first)  # rebuilt: same tokens
    # a larger budget extends the same sequence: max_tokens only says where to cut it
    assert np.array_equal(packed_rows(eval_dir, tok, 20 * SEQ, SEQ).tokens[:10], first)


def test_small_eval_set_uses_what_it_has_and_bad_budget_is_refused(setup, tmp_path):
    tok, _ = setup
    small = write_shards(tmp_path / "small", corpus(6, seed=2), files=1, row_group_rows=4)
    rows = packed_rows(small, tok, max_tokens=10_000 * SEQ, seq_len=SEQ).tokens
    assert 0 < len(rows) < 10_000
    got = evaluate_packed_bpb(Bigram(tok.vocab_size), tok, small, 10_000 * SEQ, 8, SEQ, "cpu").bpb
    assert got == pytest.approx(reference_bpb(Bigram(tok.vocab_size), tok, rows), rel=1e-6)
    with pytest.raises(ArmlabError, match=r"max_tokens \(10\) must be >= seq_len \(32\)"):
        evaluate_packed_bpb(Bigram(tok.vocab_size), tok, small, 10, 8, SEQ, "cpu")


def test_whole_set_by_default_with_per_document_sums_in_eval_set_order(setup):
    """max_tokens=None scores every row of the one-pass stream; the per-document sums add up to
    the total, follow the eval set's document order and match the definition document by document."""
    tok, eval_dir = setup
    model = Bigram(tok.vocab_size)
    whole = evaluate_packed_bpb(model, tok, eval_dir, None, 5, SEQ, "cpu")
    es = packed.packed_set(eval_dir, tok, SEQ)
    n_docs = 80  # corpus(80) in 3 files
    assert es.n_docs == n_docs and len(whole.per_doc_nats) == len(whole.per_doc_bytes) == n_docs
    assert whole.bpb == pytest.approx(reference_bpb(model, tok, es.tokens), rel=1e-6)  # float32 logits
    assert sum(whole.per_doc_nats) / (math.log(2) * sum(whole.per_doc_bytes)) == pytest.approx(whole.bpb, rel=1e-12)
    targets = es.tokens[:, 1:]
    assert whole.tokens == int((tok.token_bytes[targets] > 0).sum())
    assert whole.docs == sum(b > 0 for b in whole.per_doc_bytes) and whole.docs > n_docs // 2
    # every document's sums, from the tokens the packer placed for it (its BOS first)
    texts = corpus(80, seed=1)
    for d in range(n_docs):
        if whole.per_doc_bytes[d] == 0:
            continue
        r, c = np.nonzero(es.docs[:, 1:] == d)
        placed = targets[r, c]
        assert whole.per_doc_bytes[d] == int(tok.token_bytes[placed].sum())
        # the first token of a document is its BOS: the tokens placed for it are a prefix of its text
        full = tok.encode([texts[d]], prepend_bos=True)[0]
        rr, cc = np.nonzero(es.docs == d)
        assert list(es.tokens[rr, cc]) == full[: len(rr)]
    # a cut scores a prefix of the same stream: fewer docs, same order, per-doc sums only shrink
    cut = evaluate_packed_bpb(model, tok, eval_dir, 4 * SEQ, 5, SEQ, "cpu")
    assert cut.tokens < whole.tokens and cut.docs < whole.docs
    assert all(a <= b for a, b in zip(cut.per_doc_bytes, whole.per_doc_bytes, strict=True))
