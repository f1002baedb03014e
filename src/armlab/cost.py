"""What an experiment costs before it runs: FLOPs, GPU-hours, wall time and dollars, from the spec.

FLOPs per token are nanochat's convention (`GPT.estimate_flops`: 6 x matmul parameters plus
12 h q T per layer, T capped by the layer's attention window), computed by `budget.flops_per_token`
without building the model; a run's FLOPs are that times the tokens it consumes. GPU time is FLOPs
over (peak bf16 FLOP/s x MFU). Peaks are nanochat's table (`nanochat/common.py:get_peak_flops`,
dense bf16); MFU is an assumption the user can override. nanochat's leaderboard (README, run 1:
d24 in 3.04 h on 8xH100) works out at about half of peak on this FLOP count; 40% is the default,
a cautious one for a node that is not tuned like the speedrun (and armlab's runs also evaluate
and checkpoint). Evaluation and data preparation are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.budget import Budget, training_budget
from armlab.errors import ArmlabError
from armlab.spec import Experiment

# GPU -> peak dense bf16 FLOP/s (nanochat/common.py get_peak_flops, SXM parts)
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DEFAULT_MFU = 0.40
DEFAULT_GPUS_PER_RUN = 8  # a node, the playbook's setup


@dataclass(frozen=True)
class RunCost:
    gpu: str
    mfu: float
    gpus_per_run: int
    flops: float  # one run's training FLOPs
    runs: int  # arms x seeds

    @property
    def gpu_hours(self) -> float:
        return self.flops / (PEAK_FLOPS[self.gpu] * self.mfu) / 3600

    @property
    def wall_hours(self) -> float:
        """One run's wall time on `gpus_per_run` GPUs (perfect data-parallel scaling assumed)."""
        return self.gpu_hours / self.gpus_per_run

    @property
    def total_gpu_hours(self) -> float:
        return self.gpu_hours * self.runs


def gpus_per_run(exp: Experiment, override: int | None = None) -> int:
    """--gpus, else the hosts' GPUs per run (on each of a run's nodes: a host's gpus_per_run or
    gpus_per_node, else all its GPUs), else a node."""
    if override:
        return override
    counts = [h.ranks_per_node("cuda") * h.nodes_of_run for h in exp.hosts if h.device == "cuda"]
    counts = [c for c in counts if c]
    return min(counts) if counts else DEFAULT_GPUS_PER_RUN


def parse_mfu(values: list[str] | None) -> dict[str, float]:
    """`--mfu 0.5` (every GPU) or `--mfu H100=0.45` (repeatable) -> {gpu: mfu}."""
    out = dict.fromkeys(PEAK_FLOPS, DEFAULT_MFU)
    for v in values or []:
        gpu, _, x = v.rpartition("=")
        try:
            mfu = float(x)
        except ValueError:
            raise ArmlabError(f"--mfu {v!r}: expected a fraction such as 0.4 or H100=0.45") from None
        if not 0 < mfu <= 1:
            raise ArmlabError(f"--mfu {v!r}: MFU is a fraction of peak, in (0, 1]")
        if gpu and gpu.upper() not in PEAK_FLOPS:
            raise ArmlabError(f"--mfu {v!r}: unknown GPU {gpu!r} (known: {', '.join(PEAK_FLOPS)})")
        for g in [gpu.upper()] if gpu else list(out):
            out[g] = mfu
    return out


def costs(
    exp: Experiment, mfu: dict[str, float], gpus: int | None = None, budget: Budget | None = None
) -> list[RunCost]:
    """One RunCost per GPU type, for every run of the experiment (every arm x every seed)."""
    b = budget or training_budget(exp)
    runs = len(exp.arms) * len(exp.train.seeds)
    n = gpus_per_run(exp, gpus)
    return [RunCost(g, mfu[g], n, float(b.flops_per_token) * b.tokens, runs) for g in PEAK_FLOPS]


def render_ladder(exp: Experiment, mfu: dict[str, float], gpus: int | None = None) -> str:
    """What each depth of a `[ladder]` costs (every arm x seed at every depth), on H100s, and the
    ladder's total against the target depth alone."""
    seeds, gpu = len(exp.train.seeds), "H100"
    n = gpus_per_run(exp, gpus)
    rows = [["depth", "params (scaling)", "tokens/run", "FLOPs/run", f"{gpu} GPU-h/run", "runs", f"{gpu} GPU-h"]]
    total = target = 0.0
    for rung in exp.rungs():
        b = training_budget(rung)
        c = RunCost(gpu, mfu[gpu], n, float(b.flops_per_token) * b.tokens, len(exp.arms) * seeds)
        total += c.total_gpu_hours
        if rung.model.depth == exp.model.depth:
            target = c.total_gpu_hours
        rows.append([f"d{rung.model.depth}" + (" (target)" if rung.model.depth == exp.model.depth else ""),
                     _si(b.params.scaling).strip(), _si(b.tokens).strip(), f"{c.flops:.3e}", _num(c.gpu_hours),
                     str(c.runs), _num(c.total_gpu_hours)])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"ladder: {len(exp.ladder.depths)} depths x {len(exp.arms)} arms x {seeds} seeds, each depth "
             f"ratio {exp.train.param_data_ratio:g} x its own parameters"]  # fmt: skip
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    more = f" ({total / target - 1:.0%} more than the target depth alone)" if target else ""
    lines.append(f"ladder total: {_num(total)} {gpu} GPU-h at {mfu[gpu]:.0%} MFU{more}")
    return "\n".join(lines)


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.2g} s"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:,.1f} h"


def _num(x: float) -> str:
    """1,234.5 / 12.3 / 0.0123: three significant figures for small values."""
    return f"{x:,.1f}" if x >= 10 else f"{x:.3g}"


def _si(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if x >= scale:
            return f"{x / scale:,.2f} {unit}"
    return f"{x:.0f} "


def render_costs(
    exp: Experiment, rows: list[RunCost], usd_per_gpu_hour: float | None, budget: Budget | None = None
) -> str:
    """The pricing table: per run and for the whole experiment, one row per GPU type."""
    b = budget or training_budget(exp)
    first = rows[0]
    lines = [
        f"compute: {_si(b.flops_per_token)}FLOPs/token (nanochat's estimate_flops, windows counted) x "
        f"{_si(b.tokens)}tokens = {first.flops:.3e} FLOPs per run; {first.runs} runs "
        f"({len(exp.arms)} arms x {len(exp.train.seeds)} seed{'s' if len(exp.train.seeds) != 1 else ''}) = {first.flops * first.runs:.3e} FLOPs",
    ]
    header = ["gpu", "mfu", "GPU-h/run", f"wall/run ({first.gpus_per_run} GPUs)", "GPU-h total"]
    if usd_per_gpu_hour is not None:
        header += [f"$/run @ ${usd_per_gpu_hour:g}/GPU-h", "$ total"]
    table = [header]
    for r in rows:
        row = [r.gpu, f"{r.mfu:.0%}", _num(r.gpu_hours), _hours(r.wall_hours), _num(r.total_gpu_hours)]
        if usd_per_gpu_hour is not None:
            row += [_num(r.gpu_hours * usd_per_gpu_hour), _num(r.total_gpu_hours * usd_per_gpu_hour)]
        table.append(row)
    widths = [max(len(t[i]) for t in table) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip() for t in table]
    lines.append(
        "assumes the MFU shown (--mfu 0.45 or --mfu H100=0.45) and perfect scaling over the GPUs of a run "
        "(--gpus N); evaluation and data preparation not included"
    )
    return "\n".join(lines)
