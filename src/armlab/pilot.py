"""A CPU-sized first experiment: the numbers `armlab init --cpu` writes, so a pilot runs on a laptop
as it is (0.2's template needed 8 edits on a 2-core box before anything trained).

Every number is chosen so that the checks of `plan` and `train` pass and the whole pipeline
(prepare, tokenizer, 2 arms x 2 seeds, evaluate, compare) ends in minutes on two cores:

- a tiny GPT (depth 4, width 128: two heads of 64; 256-token context; a 2,048-token vocabulary),
  about 2M parameters: on two cores, nanochat's recipe at this size trains at thousands of
  tokens a second;
- a total batch of device_batch_size x max_seq_len x 2, which one or two ranks split evenly;
- a horizon the arms can feed without repeating (the smallest arm's estimated tokens / batch,
  capped at MAX_STEPS), each arm capped by `max_tokens` at twice what a run reads, so a large
  pool is read once but only a sample is written;
- a warmup of 5% of the steps (nanochat's 40 steps would not fit a 200-step horizon together
  with its 65% warmdown), val bpb and a checkpoint every quarter of the run;
- an eval set of EVAL_DOCS documents, and in-training eval tokens that fit in it; a tokenizer
  sample of TOKENIZER_CHARS, or most of a smaller pool (so prepare finds what it is asked for);
- CORE on at most 20 items a task when DCLM's bundle is cached or answers (a bounded check, not
  an assumption), else `core_bundle = "none"` with the reason.

Token counts are estimated as chars / 4, as `train`'s repeat check does (data.select.CHARS_PER_TOKEN).
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.data.select import CHARS_PER_TOKEN

EVAL_DOCS = 200
TOKENIZER_CHARS = 5_000_000
DEPTH, ASPECT_RATIO, HEAD_DIM, SEQ_LEN = 4, 32, 64, 256
VOCAB_SIZE = 2048
DEVICE_BATCH = 4
RANKS = 2  # the total batch splits over 1 or 2 ranks (`--nproc 2` on a 2-core box)
MAX_STEPS, MIN_STEPS = 200, 50
MAX_PER_TASK = 20  # CORE items per task: a minute or so per run on a CPU
MARGIN = 0.8  # of an arm's estimated tokens a run may plan to read (the estimate is the first file's)
ASSUMED_CHARS_PER_DOC = 3_000.0  # without `--from`: fineweb-edu's documents are about this long


@dataclass(frozen=True)
class PoolSize:
    """What `init` read of the pool: documents (first file's rows x files) and their mean length."""

    docs: int | None
    chars_per_doc: float | None


@dataclass(frozen=True)
class CpuPilot:
    """The numbers of a CPU pilot, each written into the experiment file with its reason."""

    eval_docs: int
    eval_tokens: int
    train_chars: int  # the tokenizer's sample: TOKENIZER_CHARS, or what a small pool holds
    num_iterations: int
    warmup_steps: int
    every: int  # eval_every and save_every
    arm_tokens: int  # each arm's max_tokens
    allow_repeat: bool  # the pool is too small for MIN_STEPS without repeating
    core_bundle: str | None  # None: DCLM's default (with max_per_task); "none": off
    core_reason: str  # why, for the comment

    device_batch_size: int = DEVICE_BATCH
    max_seq_len: int = SEQ_LEN

    @property
    def total_batch_size(self) -> int:
        return self.device_batch_size * self.max_seq_len * RANKS


def size_pilot(pool: PoolSize, arm_ratio: float, core: tuple[str | None, str]) -> CpuPilot:
    """The pilot for a pool of `pool`'s size whose arms each take `arm_ratio` of it (after the
    eval set); `core`: (core_bundle to write, why) from `core_check`."""
    chars_per_doc = pool.chars_per_doc or ASSUMED_CHARS_PER_DOC
    eval_docs = EVAL_DOCS if pool.docs is None else max(10, min(EVAL_DOCS, pool.docs // 20))
    batch = DEVICE_BATCH * SEQ_LEN * RANKS
    if pool.docs is None:
        steps, repeat = MAX_STEPS, False
    else:
        arm_tokens = (pool.docs - eval_docs) * arm_ratio * chars_per_doc / CHARS_PER_TOKEN
        fits = int(MARGIN * arm_tokens // batch)  # the sizes are estimated from the first file
        steps, repeat = max(MIN_STEPS, min(MAX_STEPS, fits)), fits < MIN_STEPS
    micro = DEVICE_BATCH * SEQ_LEN  # the eval reads whole micro-batches
    eval_set_tokens = eval_docs * chars_per_doc / CHARS_PER_TOKEN
    eval_tokens = max(micro, min(8 * micro, int(eval_set_tokens / 2) // micro * micro))
    pool_chars = None if pool.docs is None else (pool.docs - eval_docs) * chars_per_doc
    return CpuPilot(
        eval_docs=eval_docs,
        eval_tokens=eval_tokens,
        train_chars=TOKENIZER_CHARS if pool_chars is None else max(1, min(TOKENIZER_CHARS, int(MARGIN * pool_chars))),
        num_iterations=steps,
        warmup_steps=max(1, round(0.05 * steps)),
        every=max(1, steps // 4),
        arm_tokens=2 * steps * batch,
        allow_repeat=repeat,
        core_bundle=core[0],
        core_reason=core[1],
    )


def core_check(url: str) -> tuple[str | None, str]:
    """(core_bundle to write, why): DCLM's bundle if it is cached here or its URL answers a
    bounded HEAD now, else "none". Checked, never assumed: an offline laptop gets a pilot
    that runs, not one that stops at the download."""
    from armlab.evaluate import bundle

    if bundle.cached(url) is not None:
        return None, "the bundle is cached here"
    problem = bundle.probe(url)
    if problem is None:
        return None, "the bundle's URL answers from here, checked by armlab init"
    return "none", f"the bundle's URL is {problem} from here, checked by armlab init"
