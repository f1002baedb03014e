"""What `armlab plan` refuses and warns about: the checks `train` and the scheduler make, asked
before anything runs (0.2's plan priced a total batch no rank count could split, and named a
flag the user never typed when train later refused it).

Each check lives where the command that enforces it lives (`budget.grad_accum_steps` for the
batch, `ops.schedule.check_batch` for the hosts' rank counts, `train.recipe.schedule_misfit`
for the schedule); this module only applies them to what the plan knows of the world sizes:
one rank always, each `[[hosts]]` entry's ranks, and `--gpus N` when given. The plan's numbers
use the trained tokenizer's vocabulary once it exists (else `tokenizer.vocab_size`).
"""

from __future__ import annotations

from armlab.budget import Budget, batch_phrase, grad_accum_steps
from armlab.cost import DEFAULT_GPUS_PER_RUN
from armlab.errors import ArmlabError
from armlab.spec import Experiment


def plan_budget(exp: Experiment) -> tuple[Budget, int, str]:
    """(the run's budget, the vocabulary it assumes, where that vocabulary comes from)."""
    from armlab.tokenizer import trained_vocab_size
    from armlab.train.engines import get_engine

    trained = trained_vocab_size(exp)
    vocab = trained or exp.tokenizer.vocab_size
    source = "the trained tokenizer's" if trained else "tokenizer.vocab_size; the trained tokenizer's once it exists"
    return get_engine(exp.train.engine).budget(exp, vocab), vocab, source


def _split(exp: Experiment, budget: Budget, ranks: int) -> None:
    t = exp.train
    grad_accum_steps(
        budget.total_batch_size, t.device_batch_size, exp.model.max_seq_len, ranks,
        batch_phrase(t, budget.total_batch_size),
    )  # fmt: skip


def check_plan(exp: Experiment, budget: Budget, gpus: int | None = None) -> list[str]:
    """Refuse (ArmlabError) what `train` or `launch` would refuse; return the warnings."""
    from armlab.ops.schedule import check_batch
    from armlab.train.recipe import schedule_misfit

    _split(exp, budget, 1)  # even one rank needs whole micro-batches
    if exp.hosts:
        check_batch(exp, exp.hosts, None, budget)
    if gpus:
        try:
            _split(exp, budget, gpus)
        except ArmlabError as e:
            raise ArmlabError(f"--gpus {gpus}: {e}") from None
    warnings = []
    if misfit := schedule_misfit(exp.train, budget.num_iterations, defaults=exp.train.engine == "builtin"):
        warnings.append(misfit)
    return warnings


def gpus_to_price(exp: Experiment, budget: Budget, gpus: int | None) -> int | None:
    """GPUs per run for the GPU rows: --gpus, else the hosts' (None: `cost.gpus_per_run` reads
    them), else the most of a node's 8 that split the total batch (a CPU pilot's 2,048-token
    batch is priced on 2 GPUs, not refused on 8)."""
    if gpus or any(h.device == "cuda" for h in exp.hosts):
        return gpus
    for n in range(DEFAULT_GPUS_PER_RUN, 0, -1):
        try:
            _split(exp, budget, n)
        except ArmlabError:
            continue
        return n
    return None
