"""Val bpb over whole documents (the headline): every byte of the eval set, each token scored once,
long documents in sliding windows; checked against a brute-force per-token computation with a real
(tiny, random) GPT whose predictions depend on their context."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from armlab.evaluate.bpb import doc_windows, eval_plan, evaluate_bpb, min_context
from armlab.evaluate.docs import eval_docs, read_texts, sample_docs
from armlab.tokenizer import Tokenizer
from armlab.train.model import GPTConfig, build_model
from tok_util import corpus, trained_tokenizer, write_shards

SEQ = 32


def tiny_gpt(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(depth=1, vocab_size=vocab, seq_len=SEQ, aspect_ratio=64, head_dim=32)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("wholebpb")
    tok = trained_tokenizer(root)
    texts = corpus(60, seed=3)
    eval_dir = write_shards(root / "eval", texts, files=2, row_group_rows=16)
    return tok, eval_dir, texts


@torch.no_grad()
def brute_force(model, tok: Tokenizer, doc: list[int]) -> float:
    """nats of every target of one document, one forward call per target, with the context the
    method defines in closed form: targets 1..T see the document's start; target j > T sees BOS +
    doc[a:j], a = the start of the window that scores it (windows advance by T - K)."""
    k = min_context(SEQ)
    total = 0.0
    for j in range(1, len(doc)):
        if j <= SEQ:
            ctx = doc[:j]
        else:
            a = SEQ + 1 + ((j - SEQ - 1) // (SEQ - k)) * (SEQ - k) - k
            ctx = [tok.bos_id, *doc[a:j]]
            assert k <= j - a <= SEQ - 1  # at least K tokens of its own document, within the context
        logits = model(torch.tensor([ctx]))[0, -1].double()
        total -= float(torch.log_softmax(logits, -1)[doc[j]])
    return total


def test_windows_score_every_target_once_with_at_least_k_context():
    for length in (1, 2, SEQ, SEQ + 1, SEQ + 2, 3 * SEQ + 7, 10 * SEQ):
        wins = doc_windows(length, SEQ, SEQ // 2)
        scored = []
        for start, end, first in wins:
            assert end - start + (start > 0) <= SEQ + 1  # BOS + tokens fit the context
            targets = list(range(start, end)) if start else list(range(1, end))
            scored += targets[first:]
            if start:
                assert first == SEQ // 2  # every scored target has >= K tokens of its document before it
        assert scored == list(range(1, length))


def test_whole_documents_equal_brute_force_and_cover_every_byte(setup):
    tok, eval_dir, texts = setup
    model = tiny_gpt(tok.vocab_size)
    got = evaluate_bpb(model, tok, eval_dir, None, batch_size=3, seq_len=SEQ, device="cpu")
    docs = eval_docs(eval_dir, tok)
    assert read_texts(eval_dir) == texts and got.docs == len(texts) == docs.n
    long = [d for d in range(docs.n) if len(docs.doc(d)) > SEQ + 1]
    assert len(long) > 10  # most stdlib docstrings are longer than the 32-token context
    # every byte: per-document bytes are the UTF-8 bytes of the text, coverage 100%
    assert got.per_doc_bytes == [len(t.encode()) for t in texts]
    assert got.bytes == got.eval_bytes and got.coverage == 1.0
    assert got.tokens == int((tok.token_bytes[docs.tokens] > 0).sum())  # every token but BOS, once
    # the per-document nats are the brute-force per-token sums (float32 logits)
    for d in [*long[:3], *[d for d in range(docs.n) if d not in long][:2]]:
        want = brute_force(model, tok, docs.doc(d).tolist())
        assert got.per_doc_nats[d] == pytest.approx(want, rel=2e-5), d
    total = sum(got.per_doc_nats) / (math.log(2) * sum(got.per_doc_bytes))
    assert got.bpb == pytest.approx(total, rel=1e-12)
    # batch size is a memory knob only
    other = evaluate_bpb(model, tok, eval_dir, None, batch_size=7, seq_len=SEQ, device="cpu")
    assert other.bpb == pytest.approx(got.bpb, rel=1e-6)


def test_in_training_sample_is_fixed_whole_documents_scored_as_in_the_final_eval(setup):
    tok, eval_dir, _ = setup
    model = tiny_gpt(tok.vocab_size)
    docs = eval_docs(eval_dir, tok)
    small, large = sample_docs(docs, 300, seed=0), sample_docs(docs, 900, seed=0)
    assert set(small) < set(large)  # a larger budget takes a superset
    assert np.array_equal(small, sample_docs(docs, 300, seed=0))  # fixed: the same for every run
    assert not np.array_equal(small, sample_docs(docs, 300, seed=1))  # eval.seed picks it
    targets = (docs.lengths[small] - 1).sum()
    assert targets >= 300 and targets - (docs.lengths[small] - 1).max() < 300  # whole docs, just enough
    part = evaluate_bpb(model, tok, eval_dir, 300, batch_size=4, seq_len=SEQ, device="cpu")
    whole = evaluate_bpb(model, tok, eval_dir, None, batch_size=4, seq_len=SEQ, device="cpu")
    # each sampled document scores exactly as in the whole-set evaluation (no packing neighbours)
    for d in range(docs.n):
        if d in set(small):
            assert part.per_doc_nats[d] == pytest.approx(whole.per_doc_nats[d], rel=1e-5)
            assert part.per_doc_bytes[d] == whole.per_doc_bytes[d]
        else:
            assert part.per_doc_bytes[d] == 0 and part.per_doc_nats[d] == 0
    assert part.docs == len(small) and part.coverage < 1


def test_small_eval_set_is_said_once(setup, capsys):
    tok, eval_dir, _ = setup
    for _ in range(3):
        eval_plan(eval_dir, tok, 10**9, SEQ, 4 * SEQ)
    err = capsys.readouterr().err
    assert err.count("fewer than the 1,000,000,000 asked for") == 1, err


def _rank_main(rank: int, world_size: int, init_file: str, tok_dir: str, eval_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    try:
        tok = Tokenizer.load(tok_dir)
        value = evaluate_bpb(tiny_gpt(tok.vocab_size), tok, eval_dir, None, 2, SEQ, "cpu", rank=rank,
                             world_size=world_size)  # fmt: skip
        with open(f"{out}.{rank}", "w") as f:
            f.write(json.dumps({"bpb": value.bpb, "nats": value.per_doc_nats, "bytes": value.per_doc_bytes}))
        dist.barrier()  # both ranks done before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.mark.e2e
def test_distributed_bpb_equals_single_process(setup, tmp_path):
    """2 gloo processes deal the forward calls between them; the all-reduced sums are W=1's."""
    tok, eval_dir, _ = setup
    tok_dir = next(p.parent for p in eval_dir.parent.glob("wd/tokenizer/manifest.json"))
    single = evaluate_bpb(tiny_gpt(tok.vocab_size), tok, eval_dir, None, 2, SEQ, "cpu")
    out = tmp_path / "bpb"
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tok_dir), str(eval_dir), str(out)), nprocs=2)
    values = [json.loads((tmp_path / f"bpb.{r}").read_text()) for r in range(2)]
    assert values[0] == values[1]
    assert values[0]["bpb"] == pytest.approx(single.bpb, rel=1e-12)
    assert values[0]["bytes"] == single.per_doc_bytes
    assert values[0]["nats"] == pytest.approx(single.per_doc_nats, rel=1e-12)

