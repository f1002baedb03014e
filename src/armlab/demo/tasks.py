"""The demo's own CORE-format bundle, built from held-out eval documents (no network, no DCLM).

Only eval documents that score as good text are used, split into sentences of 10-40 words:
- demo_next_word (language_modeling, 1-shot): the first words of a sentence; correct when the
  model greedily produces the next word exactly. Chance is 0.
- demo_real_vs_shuffled (multiple_choice, 4 choices): a sentence's first half; the real second
  half vs two shuffles of it and the second half of another sentence. Chance is 25%.
- demo_real_vs_junk (multiple_choice, 2 choices): a sentence's first half; the real second half
  vs boilerplate or keyword spam of the same length. Chance is 50%.
- demo_coherent_context (schema, 2 options): the real first half vs a shuffle of it, before the
  same real second half. Chance is 50%.
They are small and easy on purpose: they show the CORE code path on a tiny model, nothing more.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pyarrow.parquet as pq

from armlab.demo.pool import BOILERPLATE, SPAM, quality_score
from armlab.errors import ArmlabError
from armlab.evaluate.bundle import write_bundle

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9 ,;:'()-]*[.!?]$")  # prose, not code or tables


def eval_sentences(eval_dir: Path, min_score: float = 0.6) -> list[list[str]]:
    """Prose sentences (as word lists) of the good held-out docs, in eval-set order."""
    out = []
    for f in sorted(eval_dir.glob("shard_*.parquet")):
        for text in pq.read_table(f, columns=["text"]).column("text").to_pylist():
            if quality_score(text) < min_score:
                continue
            for s in SENTENCE_END.split(" ".join(text.split())):
                words = s.split()
                if 10 <= len(words) <= 40 and PLAIN.match(s):
                    out.append(words)
    return out


def _shuffled(words: list[str], rng: random.Random) -> list[str]:
    out = words[:]
    for _ in range(10):
        rng.shuffle(out)
        if out != words:
            break
    return out


def demo_tasks(sentences: list[list[str]], per_task: int = 60, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = sentences[:]
    rng.shuffle(pool)

    def take() -> list[list[str]]:
        return [pool.pop() for _ in range(min(per_task, len(pool)))]

    next_word = [{"context": " ".join(w[: len(w) // 2]), "continuation": w[len(w) // 2]} for w in take()]
    shuffled = []
    for w in take():
        h = len(w) // 2
        other = rng.choice(sentences)
        choices = [
            " ".join(w[h:]),
            " ".join(_shuffled(w[h:], rng)),
            " ".join(_shuffled(w[h:], rng)),
            " ".join(other[len(other) // 2 :]),
        ]
        order = list(range(4))
        rng.shuffle(order)
        shuffled.append(
            {"query": " ".join(w[:h]), "choices": [choices[i] for i in order], "gold": order.index(0)}
        )
    junk = []
    for w in take():
        h = len(w) // 2
        real = " ".join(w[h:])
        filler = (
            " ".join(rng.choice(SPAM) for _ in range(len(w) - h))
            if rng.random() < 0.5
            else rng.choice(BOILERPLATE)
        )
        gold = rng.randrange(2)
        choices = [filler, real] if gold else [real, filler]
        junk.append({"query": " ".join(w[:h]), "choices": choices, "gold": gold})
    schema = []
    for w in take():
        h = len(w) // 2
        gold = rng.randrange(2)
        real, fake = " ".join(w[:h]), " ".join(_shuffled(w[:h], rng))
        schema.append(
            {
                "context_options": [fake, real] if gold else [real, fake],
                "continuation": " ".join(w[h:]),
                "gold": gold,
            }
        )
    return [
        {
            "label": "demo_next_word",
            "icl_task_type": "language_modeling",
            "num_fewshot": 1,
            "continuation_delimiter": " ",
            "random_baseline": 0.0,
            "items": next_word,
            "description": "next word of a held-out sentence, exact greedy match",
        },
        {
            "label": "demo_real_vs_shuffled",
            "icl_task_type": "multiple_choice",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 25.0,
            "items": shuffled,
            "description": "real sentence ending vs shuffled or foreign endings",
        },
        {
            "label": "demo_real_vs_junk",
            "icl_task_type": "multiple_choice",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 50.0,
            "items": junk,
            "description": "real sentence ending vs boilerplate or keyword spam",
        },
        {
            "label": "demo_coherent_context",
            "icl_task_type": "schema",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 50.0,
            "items": schema,
            "description": "real sentence start vs shuffled start before the same ending",
        },
    ]


def build_demo_bundle(eval_dir: Path, dest: Path, per_task: int = 40) -> Path:
    """Write the demo bundle to `dest` (reused when present: its content depends only on the eval set)."""
    if (dest / "core.yaml").is_file():
        return dest
    sentences = eval_sentences(eval_dir)
    per_task = min(per_task, len(sentences) // 4)
    if per_task < 10:
        raise ArmlabError(
            f"{eval_dir}: only {len(sentences)} prose sentences in the eval set; the demo tasks need 40+"
        )
    return write_bundle(dest, demo_tasks(sentences, per_task), name="armlab-demo", demo=True)
