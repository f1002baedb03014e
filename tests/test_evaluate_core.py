"""Batched CORE scoring against real nanochat's `core_eval.evaluate_example`, item by item.

armlab scores every item of a task in a few length-sorted forward calls; nanochat runs one call
per item. On the same model, tokenizer and items every per-item outcome must agree (the model is
random but far from uniform, so a float-rounding tie cannot flip an answer).
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from armlab.evaluate.bundle import load_bundle, write_bundle
from armlab.evaluate.core import Row, batches, evaluate_core, task_items
from armlab.tokenizer import Tokenizer
from armlab.train.model import GPT, GPTConfig
from nanochat_util import snapshot
from tok_util import corpus


def real_tasks(seed: int = 0) -> list[dict]:
    """Tasks of each type built from real sentences (stdlib docstrings), with few-shot examples."""
    rng = random.Random(seed)
    sents = [s.split() for d in corpus() for s in d.split(". ") if 6 <= len(s.split()) <= 14]
    rng.shuffle(sents)
    mc, schema, lm = [], [], []
    for w in sents[:30]:
        h = len(w) // 2
        wrong = w[h:][::-1]
        other = rng.choice(sents)
        choices = [" ".join(w[h:]), " ".join(wrong), " ".join(other[len(other) // 2 :])]
        gold = rng.randrange(3)
        choices[0], choices[gold] = choices[gold], choices[0]
        mc.append({"query": " ".join(w[:h]), "choices": choices, "gold": gold})
    for w in sents[30:60]:
        h = len(w) // 2
        gold = rng.randrange(2)
        real, fake = " ".join(w[:h]), " ".join(w[:h][::-1])
        schema.append(
            {
                "context_options": [fake, real] if gold else [real, fake],
                "continuation": " ".join(w[h:]),
                "gold": gold,
            }
        )
    for w in sents[60:120]:
        lm.append({"context": " ".join(w) + " ", "continuation": "?"})  # trailing space: nanochat trims it
    base = {"continuation_delimiter": " ", "random_baseline": 25.0}
    return [
        {**base, "label": "mc", "icl_task_type": "multiple_choice", "num_fewshot": 2, "items": mc},
        {**base, "label": "schema", "icl_task_type": "schema", "num_fewshot": 1, "items": schema},
        {
            **base,
            "label": "lm",
            "icl_task_type": "language_modeling",
            "num_fewshot": 0,
            "items": lm,
            "continuation_delimiter": "",
        },
    ]


@torch.no_grad()
def greedy_continuations(model: GPT, tok: Tokenizer, lm: list[dict]) -> None:
    """Give half of the lm items the model's own 2-byte greedy continuation (correct), the other
    half a different one (wrong), so that exact-match scoring is tested both ways."""
    for i, item in enumerate(lm):
        ids = tok.encode([item["context"].strip()])[0]
        for _ in range(2):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ok = all(b < 128 and chr(b).isalnum() for b in ids[-2:])
        guess = bytes(ids[-2:]) if ok else b""
        item["continuation"] = guess.decode() if ok and i % 2 == 0 else "zq" if guess != b"zq" else "qz"


class NanochatTokenizer:
    """nanochat's tokenizer call convention over armlab's tokenizer."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def get_bos_token_id(self) -> int:
        return self.tok.bos_id

    def __call__(self, texts: list[str], prepend: int | None = None) -> list[list[int]]:
        return self.tok.encode(texts, prepend_bos=prepend is not None)


def test_batched_scores_equal_nanochat_item_by_item(tmp_path: Path) -> None:
    nanochat = str(snapshot("92d63d4"))  # skips, saying why, where the team's snapshots are absent
    sys.path.insert(0, nanochat)
    try:
        from nanochat.core_eval import evaluate_example
    finally:
        sys.path.remove(nanochat)

    tok = Tokenizer.from_merges({bytes([i]): i for i in range(256)})  # byte-level: no merges needed
    torch.manual_seed(0)
    model = GPT(GPTConfig(depth=2, vocab_size=tok.vocab_size, seq_len=1024, aspect_ratio=64, head_dim=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)  # far from uniform: choices differ by much more than float rounding
        printable = torch.zeros(model.lm_head.weight.size(0), dtype=torch.bool)
        printable[ord("a") : ord("z") + 1] = True
        model.lm_head.weight[~printable] = 0  # greedy text is letters: lm items can be made right
    model.eval()
    tasks = real_tasks()
    greedy_continuations(model, tok, tasks[2]["items"])
    bundle = load_bundle(write_bundle(tmp_path / "b", tasks))
    ours = evaluate_core(model, tok, bundle, batch_tokens=2048)
    for task in bundle.tasks:
        items = task_items(bundle, task, None)
        meta = {
            "task_type": task.task_type,
            "num_fewshot": task.num_fewshot,
            "continuation_delimiter": task.continuation_delimiter,
        }
        theirs = [
            int(evaluate_example(i, model, NanochatTokenizer(tok), items, "cpu", meta))
            for i in range(len(items))
        ]
        got = ours.tasks[task.label].correct
        assert got == theirs, task.label
        assert 0 < sum(got) < len(got), task.label  # a mix of right and wrong: the comparison has teeth
        assert ours.tasks[task.label].accuracy == pytest.approx(sum(theirs) / len(theirs))


def test_batches_respect_the_token_budget_and_pad_little() -> None:
    lengths = [100, 98, 97, 90, 74, 60, 59, 20, 19, 5]
    rows = [Row(i, [0] * n, 1, n) for i, n in enumerate(lengths)]
    groups = batches(rows, batch_tokens=300)
    assert sorted(r for g in groups for r in g) == list(range(len(rows)))
    for g in groups:
        longest = max(lengths[r] for r in g)
        assert len(g) * longest <= 300 or len(g) == 1
        assert min(lengths[r] for r in g) >= 0.75 * longest
    assert groups[0] == [0, 1, 2]  # 4 x 100 would exceed 300
