"""Whether a run torch.compiles its model and optimiser: always on CUDA, on CPU when it pays.

On CPU a compiled step is about 1.5x faster than an eager one (depth 4, batch 1 x 2048, 2
threads: 1,584 vs 1,053 tok/s, issue 17), but a cold compile costs about a minute of one core
plus a few seconds per layer, so a short run (a smoke test, the demo, a CPU pilot) finishes
sooner eagerly. The plan decides once, from the planned steps and estimates of both sides, and
records it (run.json `config.compile`): a resumed run keeps the choice (compiled and eager steps
differ in the last bits, and a resume must continue the run bitwise), and every node of a
multi-node run takes node 0's.

The eager step time is estimated from the model's FLOPs per step and a 0.3 s matmul probe of this
machine at the ranks' thread count, times the share of that rate an eager training step reaches
(EAGER_EFFICIENCY, measured at depth 4: 0.32-0.42 under load; overhead-bound tiny models reach
less, which only makes compiling look less worth it, rightly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CPU_SPEEDUP = 1.5  # compiled / eager step rate on CPU (issue 17's measurement at depth 4)
EAGER_EFFICIENCY = 0.35  # an eager training step's FLOP/s / the probe matmul's
COMPILE_BASE_S = 45.0  # a cold compile of the model and both optimiser steps, one core
COMPILE_PER_LAYER_S = 5.0


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str  # one line for people: why


def cpu_matmul_flops(dim: int, rows: int, threads: int, seconds: float = 0.3) -> float:
    """FLOP/s of a model-shaped matmul ((rows x dim) @ (dim x 4 dim), the MLP's) with `threads`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, w = torch.randn(rows, dim), torch.randn(4 * dim, dim)
        torch.mm(a, w.t())  # warm up the BLAS thread pool
        n, t0 = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - t0) < seconds:
            torch.mm(a, w.t())
            n += 1
        return 2.0 * rows * dim * 4 * dim * n / elapsed
    finally:
        torch.set_num_threads(before)


def choose(
    requested: bool, device: str, steps: int, flops_per_step: float, depth: int, probe_flops: float | None
) -> CompileChoice:
    """The decision (see the module docstring). `flops_per_step`: one rank's training FLOPs per
    optimiser step; `probe_flops`: `cpu_matmul_flops` (None: not measured, on CUDA)."""
    if not requested:
        return CompileChoice(False, "train.compile = false")
    if device != "cpu":
        return CompileChoice(True, f"always on {device}")
    eager_s = flops_per_step / max(probe_flops or 1.0, 1.0) / EAGER_EFFICIENCY
    saved_s = steps * eager_s * (1 - 1 / CPU_SPEEDUP)
    compile_s = COMPILE_BASE_S + COMPILE_PER_LAYER_S * depth
    pays = saved_s > compile_s
    what = (
        f"{steps:,} steps x ~{_dur(eager_s)} eager: compiling (~{_dur(compile_s)}) saves ~{_dur(saved_s)}"
        if pays
        else f"{steps:,} steps x ~{_dur(eager_s)} eager would save ~{_dur(saved_s)}, less than the "
        f"~{_dur(compile_s)} a compile takes"
    )
    return CompileChoice(pays, what)


def _dur(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"
