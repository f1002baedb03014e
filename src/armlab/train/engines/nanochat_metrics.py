"""nanochat's stdout -> metrics.jsonl records with armlab's field names.

`scripts.base_train` logs three kinds of lines on rank 0 (both 48804bf and 92d63d4):

    step 00042/01000 (4.20%) | loss: 5.990400 | lrm: 0.03 | dt: 137.60ms | tok/sec: 7,441 | bf16_mfu: 41.20 | epoch: 1 pq: 2 rg: 0 | total time: 0.00m | eta: 3.1m
    Step 00250 | Validation bpb: 4.858917
    Step 02000 | CORE metric: 0.1234

They become the records armlab's own trainer writes, so `status`, `compare`, the plots and the
report read nanochat runs unchanged:

    {"step", "tokens", "time", "train_loss", "lr_mult", "dt", "tok_per_s", "mfu", "epoch"}
    {"step", "tokens", "time", "val_bpb"}
    {"step", "tokens", "time", "core"}

Conventions, so the numbers mean what armlab's records mean:
- `step` counts completed optimiser steps. nanochat prints a training line with the step
  *before* incrementing it ("step 00000" is the first step done), and evaluates at the top of
  the loop ("Step 00250" is after 250 steps), so a training line's step is printed + 1.
- `train_loss` is what nanochat prints: its debiased EMA of the loss (beta 0.9), not the raw
  loss of the step (nanochat logs no other).
- `time` is the sum of the steps' `dt` (continued across a resume), like armlab's loop time.
- `mfu` is nanochat's bf16_mfu, None on CPU (nanochat divides by an infinite peak there).
- `epoch` is passes over the arm completed: nanochat's 1-based epoch minus one, plus the file
  index over the number of files where 92d63d4 prints it (48804bf prints the epoch only). It is
  the loader's read position, which runs a buffer of documents ahead of training.

Every other line (banners, config dumps, warnings, samples) is ordinary log. A line that starts
like a metric line but does not parse is kept in train.log and counted, never fatal.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

TRAIN_RE = re.compile(r"^step (\d+)/(\d+)\b")
EVAL_RE = re.compile(r"^Step (\d+) \| (Validation bpb|CORE metric): (\S+)\s*$")
LOOKALIKE = re.compile(r"^[Ss]tep \d")  # what a metric line starts with


class Unparsable(ValueError):
    """A line that looks like a nanochat metric line but is not one."""


def _number(text: str) -> float:
    """nanochat's numbers: `7,441`, `137.60ms`, `0.03`, `nan`."""
    value = float(text.strip().removesuffix("ms").replace(",", ""))
    return value


def _fields(parts: list[str]) -> dict[str, str]:
    out = {}
    for part in parts:
        key, sep, value = part.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class TrainLine:
    step: int  # as printed: the step just taken, 0-based
    total: int
    loss: float
    dt_s: float
    tok_per_s: float
    lrm: float | None
    mfu: float | None
    epoch: int | None
    pq: int | None


@dataclass(frozen=True)
class EvalLine:
    step: int
    kind: str  # "val_bpb" or "core"
    value: float


def parse_line(line: str) -> TrainLine | EvalLine | None:
    """The metric a line carries; None for ordinary log lines; `Unparsable` for lookalikes."""
    line = line.strip()
    if not LOOKALIKE.match(line):
        return None
    if m := EVAL_RE.match(line):
        try:
            value = _number(m.group(3))
        except ValueError:
            raise Unparsable(f"bad number {m.group(3)!r}") from None
        return EvalLine(int(m.group(1)), "val_bpb" if m.group(2) == "Validation bpb" else "core", value)
    m = TRAIN_RE.match(line)
    if not m:
        raise Unparsable("neither a training step nor an eval line")
    f = _fields(line.split(" | ")[1:])
    missing = [k for k in ("loss", "dt", "tok/sec") if k not in f]
    if missing:
        raise Unparsable(f"no {', '.join(missing)}")
    try:
        epoch_words = f.get("epoch", "").split()
        pq = epoch_words[epoch_words.index("pq:") + 1] if "pq:" in epoch_words else None
        return TrainLine(
            step=int(m.group(1)), total=int(m.group(2)), loss=_number(f["loss"]), dt_s=_number(f["dt"]) / 1000,
            tok_per_s=_number(f["tok/sec"]), lrm=_number(f["lrm"]) if "lrm" in f else None,
            mfu=_number(f["bf16_mfu"]) if "bf16_mfu" in f else None,
            epoch=int(epoch_words[0]) if epoch_words else None, pq=int(pq) if pq is not None else None,
        )  # fmt: skip
    except (ValueError, IndexError) as e:
        raise Unparsable(str(e)) from None


@dataclass
class MetricsParser:
    """Turns the stream of nanochat's output lines into metrics records (see the module docstring)."""

    tokens_per_step: int
    train_files: int
    mfu: bool = True  # False on CPU: nanochat's bf16_mfu is meaningless there
    time: float = 0.0  # seconds of training steps so far (a resume starts from the last record's)
    unparsed: int = 0
    examples: list[str] = field(default_factory=list)  # the first few unparsable lines

    def feed(self, line: str) -> dict[str, Any] | None:
        """The record for this line, or None (an ordinary line, or an unparsable one: counted)."""
        try:
            parsed = parse_line(line)
        except Unparsable:
            self.unparsed += 1
            if len(self.examples) < 3:
                self.examples.append(line.strip()[:200])
            return None
        if parsed is None:
            return None
        if isinstance(parsed, EvalLine):
            return {"step": parsed.step, "tokens": parsed.step * self.tokens_per_step,
                    "time": round(self.time, 3), parsed.kind: parsed.value}  # fmt: skip
        step = parsed.step + 1
        self.time += parsed.dt_s
        epoch = None
        if parsed.epoch is not None:
            frac = parsed.pq / self.train_files if parsed.pq is not None and self.train_files else 0.0
            epoch = round(parsed.epoch - 1 + frac, 4)
        mfu = parsed.mfu if self.mfu and parsed.mfu is not None and math.isfinite(parsed.mfu) else None
        return {
            "step": step,
            "tokens": step * self.tokens_per_step,
            "time": round(self.time, 3),
            "train_loss": parsed.loss,
            "lr_mult": parsed.lrm,
            "dt": round(parsed.dt_s, 6),
            "tok_per_s": parsed.tok_per_s,
            "mfu": mfu,
            "epoch": epoch,
        }
