"""The CORE metric (DCLM's in-context tasks), computed the way nanochat's base_eval does.

Per task: items are shuffled with a fixed seed (1337) and cropped to `max_per_task`; each item
gets `num_fewshot` examples drawn with `random.Random(1234 + idx)` from the other items; prompts
join examples with a blank line and query/continuation with the task's delimiter.
- multiple_choice: one prompt per choice (common prefix = context); the prediction is the
  choice with the lowest mean loss over its continuation tokens.
- schema: one prompt per context option (common suffix = continuation); lowest mean loss wins.
- language_modeling: correct when greedy argmax reproduces every continuation token.
Accuracy is centred by the task's random baseline (percent, eval_meta_data.csv):
(acc - 0.01 b) / (1 - 0.01 b); CORE is the mean of the centred scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from armlab.evaluate.bundle import Bundle, Task
from armlab.progress import progress

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234


class TokenizerLike(Protocol):
    bos_id: int

    def encode(self, texts: list[str], prepend_bos: bool = True) -> list[list[int]]: ...


# -- prompts --------------------------------------------------------------------------------------
def render_mc(item: dict, delim: str, shots: list[dict]) -> list[str]:
    head = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
    return [f"{head}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delim: str, shots: list[dict]) -> list[str]:
    head = "".join(f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in shots)
    return [f"{head}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]


def render_lm(item: dict, delim: str, shots: list[dict]) -> list[str]:
    """Two prompts: without and with the continuation. Contexts are trimmed (some datasets carry
    trailing spaces) and the prompt without is stripped, so that it tokenizes to a clean prefix."""
    head = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in shots)
    without = f"{head}{item['context'].strip()}{delim}"
    return [without.strip(), without + item["continuation"]]


def common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the common prefix (or suffix) of the token sequences."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        idx = -1 - i if from_end else i
        if any(s[idx] != seqs[0][idx] for s in seqs):
            return i
    return n


def spans(task_type: str, tokens: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """(sequences to run, start, end) of the scored span of each sequence."""
    if task_type == "multiple_choice":  # same context, different continuations
        start = common_length(tokens)
        return tokens, [start] * len(tokens), [len(t) for t in tokens]
    if task_type == "schema":  # different contexts, same continuation
        suffix = common_length(tokens, from_end=True)
        return tokens, [len(t) - suffix for t in tokens], [len(t) for t in tokens]
    without, with_ = tokens
    if not (len(without) < len(with_) and with_[: len(without)] == without):
        # BPE merged across the boundary: score the tokens past the longest common prefix instead.
        start = common_length([without, with_])
        return [with_], [start], [len(with_)]
    return [with_], [len(without)], [len(with_)]


def crop(tokens: list[list[int]], starts: list[int], ends: list[int], max_len: int | None):
    """Keep the last `max_len` tokens of long sequences (the model cannot see more)."""
    if not max_len:
        return tokens, starts, ends
    out_t, out_s, out_e = [], [], []
    for t, s, e in zip(tokens, starts, ends, strict=True):
        cut = max(0, len(t) - max_len)
        out_t.append(t[cut:])
        out_s.append(max(1, s - cut))  # position 0 has no prediction for it
        out_e.append(e - cut)
    return out_t, out_s, out_e


@torch.no_grad()
def score_item(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: TokenizerLike,
    items: list[dict],
    idx: int,
    task: Task,
    device: str | torch.device,
    max_len: int | None,
) -> bool:
    item = items[idx]
    shots: list[dict] = []
    if task.num_fewshot > 0:
        rng = random.Random(FEWSHOT_SEED + idx)
        others = [i for i in range(len(items)) if i != idx]
        shots = [items[i] for i in rng.sample(others, min(task.num_fewshot, len(others)))]
    render = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}[
        task.task_type
    ]
    prompts = render(item, task.continuation_delimiter, shots)
    tokens, starts, ends = spans(task.task_type, tokenizer.encode(prompts, prepend_bos=True))
    tokens, starts, ends = crop(tokens, starts, ends, max_len)

    # Right-pad with BOS (padding sits after every scored span, so it never affects a score).
    width = max(len(t) for t in tokens)
    ids = torch.full((len(tokens), width), tokenizer.bos_id, dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    ids = ids.to(device)
    logits = model(ids).float()
    # Position p predicts token p+1: the span [s, e) is scored by positions [s-1, e-1).
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none"
    )
    losses = losses.view(len(tokens), width - 1)
    if task.task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), ids[0, s:e]))
    mean_losses = [
        losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    ]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def centered(accuracy: float, random_baseline: float) -> float:
    """Accuracy rescaled so that chance is 0 and perfect is 1 (baseline in percent)."""
    b = 0.01 * random_baseline
    return (accuracy - b) / (1.0 - b)


def task_items(bundle: Bundle, task: Task, max_per_task: int | None) -> list[dict[str, Any]]:
    items = bundle.load_items(task)
    random.Random(SHUFFLE_SEED).shuffle(items)  # files are often ordered; a crop must be a fair sample
    return items[:max_per_task] if max_per_task else items


def evaluate_core(
    model: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: TokenizerLike,
    bundle: Bundle,
    device: str | torch.device = "cpu",
    max_per_task: int | None = None,
    max_len: int | None = None,
) -> dict[str, Any]:
    """Score every task of the bundle; returns {core, core_tasks: {label: {...}}, bundle}."""
    tasks_out: dict[str, dict[str, Any]] = {}
    loaded = [(t, task_items(bundle, t, max_per_task)) for t in bundle.tasks]
    with progress(transient=True) as bar:
        job = bar.add_task("CORE", total=sum(len(items) for _, items in loaded), unit="items")
        for task, items in loaded:
            correct = 0
            for idx in range(len(items)):
                correct += score_item(model, tokenizer, items, idx, task, device, max_len)
                bar.advance(job)
            acc = correct / len(items)
            tasks_out[task.label] = {
                "accuracy": acc,
                "centered": centered(acc, task.random_baseline),
                "n": len(items),
                "type": task.task_type,
                "num_fewshot": task.num_fewshot,
                "random_baseline": task.random_baseline,
            }
    core = sum(t["centered"] for t in tasks_out.values()) / len(tasks_out)
    return {"core": core, "core_tasks": tasks_out, "bundle": bundle.describe()}
