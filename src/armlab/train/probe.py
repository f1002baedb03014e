"""How fast this machine's CPU trains the planned model: a few real training steps, timed.

`armlab plan` prices GPU runs from FLOPs and an assumed MFU; a CPU has no such rule of thumb
(its speed at a 2M-parameter model depends on cache sizes, threads and the vocabulary more than
on peak FLOPs), so the CPU line is measured: the experiment's model (its depth, width, context
and the tokenizer's vocabulary), built and initialised as the trainer builds it, with the
trainer's optimiser and its `train_step`, on random tokens, with the threads one run of `nproc`
ranks gets (`rank_env`'s rule). The first step (allocation, warm caches) is not timed; the
median of the next `steps` is. A model too large to probe in a second or two (one step of one
sequence over PROBE_MAX_FLOPS) is not probed unless asked: it is a model for GPUs.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

from armlab.budget import Budget
from armlab.spec import Experiment

PROBE_TOKENS = 4096  # tokens of one probe step at most (whole sequences; at least one)
PROBE_MAX_FLOPS = 5e10  # a probe step above this is not run unless asked (`plan --cpu-probe`)
PROBE_STEPS = 3


@dataclass(frozen=True)
class CpuProbe:
    tokens_per_s: float
    threads: int
    batch: int  # sequences per probe step
    seq_len: int
    steps: int
    step_s: float  # median seconds per step

    def run_seconds(self, budget: Budget, nproc: int = 1) -> float:
        """One run's training time: its tokens at the measured rate of each of `nproc` ranks
        (each on its own share of the cores, as `rank_env` gives them)."""
        return budget.tokens / (self.tokens_per_s * nproc)


def probe_batch(exp: Experiment) -> int:
    return max(1, min(exp.train.device_batch_size, PROBE_TOKENS // exp.model.max_seq_len))


def probe_flops(exp: Experiment, budget: Budget) -> float:
    """FLOPs of one probe step (forward and backward of `probe_batch` sequences)."""
    return float(budget.flops_per_token) * probe_batch(exp) * exp.model.max_seq_len


def probe_threads(nproc: int = 1) -> int:
    """The threads one rank of a CPU run of `nproc` ranks uses (a user's OMP_NUM_THREADS wins)."""
    from armlab.train.engines import cpu_cores

    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, cpu_cores() // nproc)


def cpu_probe(
    exp: Experiment, budget: Budget, vocab_size: int, nproc: int = 1, steps: int = PROBE_STEPS
) -> CpuProbe:
    """Time `steps` real training steps of the experiment's model on this CPU (after one untimed)."""
    import torch

    from armlab.train import recipe, schedule
    from armlab.train.loop import Dist, Schedule, train_step
    from armlab.train.model import GPTConfig, build_model
    from armlab.train.optim import build_optimizer

    threads = probe_threads(nproc)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model(GPTConfig.from_spec(exp.model, vocab_size), "cpu")
        hp = recipe.resolve(exp.train)
        scale = schedule.scaling(budget, hp.weight_decay)
        optimizer = build_optimizer(model, **scale.learning_rates(hp))
        sched = Schedule(budget.num_iterations, 1, hp, scale.weight_decay)
        B, T = probe_batch(exp), exp.model.max_seq_len
        gen = torch.Generator().manual_seed(0)

        def random_batches():  # noqa: ANN202
            while True:
                yield torch.randint(0, vocab_size, (B, T), generator=gen), torch.randint(0, vocab_size, (B, T), generator=gen)

        batches = random_batches()
        d = Dist(rank=0, world_size=1, device=torch.device("cpu"))
        times = []
        for step in range(steps + 1):
            t0 = time.perf_counter()
            train_step(model, model, optimizer, batches, step, sched, d)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    step_s = statistics.median(times[1:])
    return CpuProbe(B * T / step_s, threads, B, T, steps, step_s)


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def cpu_estimate(exp: Experiment, budget: Budget, vocab_size: int, force: bool | None = None) -> str:
    """`armlab plan`'s CPU line: measured when the model is small enough to probe in a moment
    (or `force`), else why not. `force` False: not probed. The runs train one after another on
    one CPU host (`armlab run`'s default there); `nproc` is a CPU host entry's, else 1."""
    flops = probe_flops(exp, budget)
    if force is False:
        return "cpu: not measured (--no-cpu-probe)"
    if force is None and flops > PROBE_MAX_FLOPS:
        return (
            f"cpu: not measured: one step of {probe_batch(exp)} x {exp.model.max_seq_len} tokens is {flops:.1e} FLOPs, "
            "a model for GPUs (--cpu-probe measures it anyway)"
        )
    nproc = next((h.nproc for h in exp.hosts if h.device == "cpu"), 1)
    p = cpu_probe(exp, budget, vocab_size, nproc)
    runs = len(exp.arms) * len(exp.train.seeds)
    per_run = p.run_seconds(budget, nproc)
    ranks = f"{nproc} ranks x {p.threads} threads" if nproc > 1 else f"{p.threads} thread{'s' if p.threads > 1 else ''}"
    return (
        f"cpu (this machine, measured: {p.steps} training steps of {p.batch} x {p.seq_len} tokens, {ranks}): "
        f"{p.tokens_per_s:,.0f} tok/s -> {_duration(per_run)} per run, {_duration(per_run * runs)} for {runs} runs one "
        "after another (training only: prepare, the tokenizer and evaluation add to it)"
    )
