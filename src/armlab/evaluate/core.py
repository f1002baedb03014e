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

Continuous CORE, from the same forward calls (accuracy and its parity with nanochat are untouched):
per item, the log-probability of the correct continuation (its scored tokens' log-probs summed, in
nats) and its UTF-8 bytes, so a task's score is bits per byte of correct continuations (pooled over
items, tokenizer-independent); and for multiple-choice and schema tasks the margin: bits per byte of
the correct option minus those of the best wrong one (> 0 when the model prefers the right answer;
per byte, so long and short options compare). Why: at small scale accuracy is mostly noise, and
likelihood-based scores rank data recipes far more reliably (DataDecide, Magnusson et al. 2025;
Signal and Noise, Heineman et al. 2025, "use per-byte likelihood instead of accuracy").
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from armlab.evaluate.bundle import Bundle, Task
from armlab.evaluate.record import CoreResult, TaskResult
from armlab.progress import progress

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
# Tokens (rows x longest row) per forward call. On CPU small calls are much faster per token (the
# demo's d2 model on 2 cores: 0.5 s per evaluation at 1,024 tokens a call, 6.4 s at 16,384: the
# activations of a big call fall out of cache); a GPU wants big calls.
BATCH_TOKENS = {"cpu": 1024, "cuda": 16_384}
MIN_FILL = 0.75  # a forward call's rows are at least this fraction of its longest
LOGITS_CHUNK = 1 << 25  # logits elements upcast to fp32 at once (128 MiB)


class TokenizerLike(Protocol):
    bos_id: int
    token_bytes: Any  # UTF-8 bytes of each token id (0 for specials): the continuous scores' bytes

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


@dataclass(frozen=True)
class Row:
    """One sequence to run: the item it belongs to and the span [start, end) whose tokens it scores."""

    item: int
    tokens: list[int]
    start: int
    end: int


def fewshot_examples(items: list[dict], idx: int, k: int) -> list[dict]:
    """nanochat's draw: `k` other items, `random.Random(1234 + idx)` (the same on every run)."""
    if k <= 0:
        return []
    rng = random.Random(FEWSHOT_SEED + idx)
    others = [i for i in range(len(items)) if i != idx]
    return [items[i] for i in rng.sample(others, min(k, len(others)))]


def task_rows(tokenizer: TokenizerLike, items: list[dict], task: Task, max_len: int | None) -> list[Row]:
    """Every sequence of every item of the task, tokenized in one batch call."""
    render = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}[
        task.task_type
    ]
    prompts = [
        render(item, task.continuation_delimiter, fewshot_examples(items, i, task.num_fewshot))
        for i, item in enumerate(items)
    ]
    flat = tokenizer.encode([p for ps in prompts for p in ps], prepend_bos=True)
    rows, at = [], 0
    for i, ps in enumerate(prompts):
        tokens, starts, ends = crop(*spans(task.task_type, flat[at : at + len(ps)]), max_len)
        at += len(ps)
        rows += [Row(i, t, s, e) for t, s, e in zip(tokens, starts, ends, strict=True)]
    return rows


def batches(rows: list[Row], batch_tokens: int) -> list[list[int]]:
    """Row indices grouped into forward calls of at most `batch_tokens` (rows x longest row).

    Rows go longest first and a call closes when the next row is under MIN_FILL of its longest,
    so at most a quarter of any call is padding (one call for all would pad short rows to the
    longest: twice the compute on the demo's tasks).
    """
    order = sorted(range(len(rows)), key=lambda r: -len(rows[r].tokens))
    out: list[list[int]] = []
    for r in order:
        n = len(rows[r].tokens)
        if out:
            longest = len(rows[out[-1][0]].tokens)
            if (len(out[-1]) + 1) * longest <= batch_tokens and n >= MIN_FILL * longest:
                out[-1].append(r)
                continue
        out.append([r])
    return out


@torch.no_grad()
def score_rows(
    model: Callable[[torch.Tensor], torch.Tensor],
    rows: list[Row],
    bos_id: int,
    device: str | torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss over each row's span, whether greedy argmax reproduces the whole span, summed
    loss over the span), per row.

    Rows are right-padded with BOS: padding sits after every scored span, and attention is
    causal, so it never changes a score. Position p predicts token p+1, so the span [s, e) is
    scored by positions [s-1, e-1).
    """
    width = max(len(r.tokens) for r in rows)
    ids = torch.full((len(rows), width), bos_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
    ids = ids.to(device)
    pos = torch.arange(width - 1, device=device)
    starts = torch.tensor([r.start - 1 for r in rows], device=device)[:, None]
    ends = torch.tensor([r.end - 1 for r in rows], device=device)[:, None]
    span = (pos >= starts) & (pos < ends)  # (R, W-1)
    logits = model(ids)
    targets = ids[:, 1:]
    mean_loss = torch.empty(len(rows), device=device)
    sum_loss = torch.empty(len(rows), dtype=torch.float64, device=device)
    exact = torch.empty(len(rows), dtype=torch.bool, device=device)
    step = max(1, LOGITS_CHUNK // (width * logits.size(-1)))  # rows whose fp32 log-softmax fits the chunk
    for a in range(0, len(rows), step):
        lg = logits[a : a + step, :-1].float()
        loss = F.cross_entropy(lg.transpose(1, 2), targets[a : a + step], reduction="none")
        m = span[a : a + step]
        mean_loss[a : a + step] = (loss * m).sum(1) / m.sum(1)
        sum_loss[a : a + step] = (loss.double() * m).sum(1)
        exact[a : a + step] = ((lg.argmax(-1) == targets[a : a + step]) | ~m).all(1)
    return mean_loss.cpu(), exact.cpu(), sum_loss.cpu()


def item_correct(
    task: Task, items: list[dict], rows: list[Row], mean_loss: torch.Tensor, exact: torch.Tensor
) -> list[int]:
    """1/0 per item: language_modeling needs an exact greedy match of its one row; multiple_choice
    and schema pick the row with the lowest mean loss (the first on a tie, as nanochat does)."""
    best: dict[int, tuple[float, int]] = {}
    correct = [0] * len(items)
    seen: dict[int, int] = {}
    for r, row in enumerate(rows):
        if task.task_type == "language_modeling":
            correct[row.item] = int(exact[r])
            continue
        option = seen.get(row.item, 0)
        seen[row.item] = option + 1
        loss = float(mean_loss[r])
        if row.item not in best or loss < best[row.item][0]:
            best[row.item] = (loss, option)
    for i, (_, option) in best.items():
        correct[i] = int(option == items[i]["gold"])
    return correct


@dataclass(frozen=True)
class ItemScores:
    """The continuous scores of a task's items (see the module docstring)."""

    logprob: list[float]  # nats of the correct continuation (<= 0)
    bytes: list[int]
    margin: list[float] | None  # bits per byte, correct minus best wrong (None: language_modeling)


def item_scores(
    task: Task, items: list[dict], rows: list[Row], sum_loss: torch.Tensor, token_bytes: Any
) -> ItemScores:
    """Per item: log-prob and bytes of the correct continuation's scored span, and (choice tasks)
    the per-byte margin of the correct option over the best wrong one."""
    options: dict[int, list[tuple[float, int]]] = {}
    for r, row in enumerate(rows):
        nbytes = int(sum(int(token_bytes[t]) for t in row.tokens[row.start : row.end]))
        options.setdefault(row.item, []).append((-float(sum_loss[r]), nbytes))
    logprob, nbytes, margin = [], [], []
    for i in range(len(items)):
        opts = options[i]
        gold = 0 if task.task_type == "language_modeling" else int(items[i]["gold"])
        lp, b = opts[gold]
        logprob.append(lp)
        nbytes.append(b)
        if task.task_type != "language_modeling":
            per_byte = [x / (math.log(2) * max(n, 1)) for x, n in opts]
            wrong = [v for o, v in enumerate(per_byte) if o != gold]
            margin.append(per_byte[gold] - max(wrong) if wrong else 0.0)
    return ItemScores(logprob, nbytes, None if task.task_type == "language_modeling" else margin)


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
    batch_tokens: int | None = None,
) -> CoreResult:
    """Score every task of the bundle (armlab.evaluate.record.CoreResult: CORE, its continuous
    companions, and per task the per-item outcomes).

    Each task's per-item lists follow the fixed (shuffled, cropped) item order, the same for every
    run: what the report's item-level intervals resample. Items are batched across a task (rows
    sorted by length), not run one forward call each. Progress: items, tasks done, ETA.
    """
    tasks_out: dict[str, TaskResult] = {}
    batch_tokens = batch_tokens or BATCH_TOKENS.get(torch.device(device).type, BATCH_TOKENS["cuda"])
    loaded = [(t, task_items(bundle, t, max_per_task)) for t in bundle.tasks]
    with progress(transient=True) as bar:
        job = bar.add_task(
            f"CORE (0/{len(loaded)} tasks)", total=sum(len(items) for _, items in loaded), unit="items"
        )
        for done, (task, items) in enumerate(loaded):
            rows = task_rows(tokenizer, items, task, max_len)
            mean_loss = torch.empty(len(rows))
            sum_loss = torch.empty(len(rows), dtype=torch.float64)
            exact = torch.empty(len(rows), dtype=torch.bool)
            for group in batches(rows, batch_tokens):
                loss, ok, total = score_rows(model, [rows[r] for r in group], tokenizer.bos_id, device)
                mean_loss[group], exact[group], sum_loss[group] = loss, ok, total
                bar.advance(job, len(group) * len(items) / len(rows))  # in items, at the rows' pace
            correct = item_correct(task, items, rows, mean_loss, exact)
            scores = item_scores(task, items, rows, sum_loss, tokenizer.token_bytes)
            acc = sum(correct) / len(items)
            tasks_out[task.label] = TaskResult(
                label=task.label, type=task.task_type, n=len(items), num_fewshot=task.num_fewshot,
                random_baseline=task.random_baseline, accuracy=acc, centered=centered(acc, task.random_baseline),
                correct=[float(c) for c in correct], logprob=scores.logprob, bytes=scores.bytes, margin=scores.margin,
            )  # fmt: skip
            bar.update(job, description=f"CORE ({done + 1}/{len(loaded)} tasks)")
    return CoreResult(tasks_out, bundle.describe(), max_per_task)
