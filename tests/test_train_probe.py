"""`armlab plan`'s CPU line: a few real training steps of the planned model on this CPU, timed
(0.2's plan priced only GPUs, so a CPU pilot's time was a guess)."""

from __future__ import annotations

import re
from pathlib import Path

from armlab.budget import training_budget
from armlab.spec import parse_experiment
from armlab.train.probe import cpu_estimate, cpu_probe


def exp(tmp_path: Path, depth: int, seq: int, batch: int = 4):
    return parse_experiment(
        {
            "name": "p", "workdir": str(tmp_path / "wd"), "pool": {"uri": "p"},
            "arms": [{"name": "a", "kind": "random", "ratio": 0.5}, {"name": "b", "kind": "random", "ratio": 0.5}],
            "tokenizer": {"vocab_size": 512},
            "model": {"depth": depth, "max_seq_len": seq},
            "train": {"device_batch_size": batch, "num_iterations": 50, "seeds": [0, 1]},
        }
    )  # fmt: skip


def test_the_probe_times_real_steps_and_prices_the_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    e = exp(tmp_path, depth=2, seq=64)
    budget = training_budget(e)
    p = cpu_probe(e, budget, 512, steps=2)
    assert p.tokens_per_s > 0 and p.threads == 1 and (p.batch, p.seq_len, p.steps) == (4, 64, 2)
    assert abs(p.tokens_per_s - 4 * 64 / p.step_s) < 1e-6 * p.tokens_per_s
    assert p.run_seconds(budget) == budget.tokens / p.tokens_per_s
    line = cpu_estimate(e, budget, 512)
    m = re.match(r"cpu \(this machine, measured: 3 training steps of 4 x 64 tokens, 1 thread\): ([\d,]+) tok/s -> "
                 r"[\d.]+ (s|min|h) per run, [\d.]+ (s|min|h) for 4 runs one after another", line)  # fmt: skip
    assert m, line


def test_a_model_for_gpus_is_not_probed_unless_asked(tmp_path: Path) -> None:
    e = exp(tmp_path, depth=12, seq=2048, batch=32)
    line = cpu_estimate(e, training_budget(e), 512)
    assert line.startswith("cpu: not measured: one step of 2 x 2048 tokens is") and "--cpu-probe" in line
    assert cpu_estimate(e, training_budget(e), 512, force=False) == "cpu: not measured (--no-cpu-probe)"
