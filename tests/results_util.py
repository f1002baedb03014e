"""Hand-made run dirs that follow the run-dir contract (run.json, state.json, metrics.jsonl,
eval.json), for testing status and compare without training."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from armlab.spec import Experiment, parse_experiment
from armlab.workdir import atomic_write_json, freeze_spec, open_workdir


def tiny_experiment(workdir: Path, seeds: list[int] | None = None, **train: Any) -> Experiment:
    return parse_experiment(
        {
            "name": "tiny",
            "workdir": str(workdir),
            "pool": {"uri": str(workdir / "pool")},
            "arms": [
                {"name": "top", "kind": "top", "ratio": 0.5, "score_column": "score"},
                {"name": "random", "kind": "random", "ratio": 0.5},
            ],
            "model": {"depth": 2, "max_seq_len": 64},
            "train": {"num_iterations": 10, "seeds": seeds or [0, 1], **train},
        }
    )


def make_run(
    exp: Experiment,
    arm: str,
    seed: int,
    *,
    bpb: float,
    core: float | None = None,
    state: str = "done",
    steps: int = 10,
    tokens_per_step: int = 1000,
    pid: int | None = None,
    comparability: dict | None = None,
    experiment: str | None = None,
    bundle_sha: str = "b" * 16,
    core_tasks: dict[str, dict] | None = None,
    per_doc: tuple[list[float], list[float]] | None = None,
) -> Path:
    """A run dir; `core_tasks` ({label: {correct, random_baseline}}) and `per_doc` ((nats, bytes))
    give eval.json per-item data, from which its CORE / val bpb are then computed."""
    wd = open_workdir(exp)
    freeze_spec(wd, exp)  # as prepare would have: the workdir then passes as EXP
    d = wd.run_dir(arm, exp.run_name(arm, seed))  # a ladder rung's runs carry their depth
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        d / "run.json",
        {
            "experiment": experiment or exp.name,
            "arm": arm,
            "seed": seed,
            "run": d.name,
            "fingerprint": exp.fingerprint(),
            "comparability": comparability or json.loads(json.dumps(exp.comparability())),
            "tokenizer_fingerprint": "tok0",
            "config": {"num_iterations": steps, "total_batch_size": tokens_per_step},
        },
    )
    now = time.time()
    atomic_write_json(
        d / "state.json",
        {
            "state": state,
            "pid": pid or os.getpid(),
            "host": socket.gethostname(),
            "started": now - 60,
            "updated": now,
            "ended": now if state == "done" else None,
            "error": None,
            "step": steps,
            "num_iterations": steps,
        },
    )
    lines = []
    for s in range(1, steps + 1):
        lines.append(
            {
                "step": s,
                "tokens": s * tokens_per_step,
                "time": s * 0.5,
                "train_loss": 5.0 - 0.1 * s,
                "lr_mult": 1.0,
                "dt": 0.5,
                "tok_per_s": 2000.0,
                "mfu": 1.0,
                "epoch": s * 0.05,
            }
        )
        if s % 5 == 0:  # the curve falls to `bpb` at the last step
            lines.append(
                {
                    "step": s,
                    "tokens": s * tokens_per_step,
                    "time": s * 0.5,
                    "val_bpb": bpb + (steps - s) * 0.02,
                }
            )
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    ev: dict = {"step": steps}
    if core_tasks is not None:
        cells = {}
        for label, t in core_tasks.items():
            acc = sum(t["correct"]) / len(t["correct"])
            b = t["random_baseline"] / 100
            cells[label] = {
                "accuracy": acc,
                "centered": (acc - b) / (1 - b),
                "n": len(t["correct"]),
                "type": "multiple_choice",
                "num_fewshot": 0,
                "random_baseline": t["random_baseline"],
                "correct": list(t["correct"]),
            }
        core = sum(c["centered"] for c in cells.values()) / len(cells)
    elif core is not None:
        cells = {
            "t1": {
                "accuracy": 0.5,
                "centered": core,
                "n": 10,
                "type": "multiple_choice",
                "num_fewshot": 0,
                "random_baseline": 25.0,
            }
        }
    if core is not None:
        ev.update(
            core=core,
            core_tasks=cells,
            bundle={"sha256": bundle_sha, "demo": True, "name": "demo", "tasks": list(cells), "source": "x"},
        )
    if per_doc is not None:
        nats, nbytes = per_doc
        bpb = sum(nats) / (math.log(2) * sum(nbytes))
        ev.update(val_bpb_per_doc={"nats": list(nats), "bytes": list(nbytes)}, val_bpb_docs=len(nats),
                  val_bpb_tokens=len(nats) * 10)
    if core is not None or per_doc is not None:
        atomic_write_json(d / "eval.json", {**ev, "val_bpb": bpb})
    return d
