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

from armlab.evaluate.checkpoints import weights_sha256
from armlab.evaluate.record import (
    WHOLE_DOCS,
    BpbMethod,
    BpbResult,
    CheckpointRef,
    CheckpointScores,
    CoreResult,
    EvalResult,
    EvalSetRef,
    TaskResult,
)
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
    evaluated: bool = True,
    history: list[dict[str, dict]] | None = None,
) -> Path:
    """A run dir with a final checkpoint and, unless `evaluated` is false, its eval.json (a v2
    EvalResult tied to that checkpoint and the workdir's eval set); `core_tasks` ({label: {correct,
    random_baseline}}) and `per_doc` ((nats, bytes)) give it per-item data, from which its CORE /
    val bpb are then computed; `history` ({task: {centered, lp, margin}} per checkpoint, oldest first)
    gives its last-k checkpoint scores."""
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
                "train_loss": 5.0 - 0.1 * s + 0.001 * seed,
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
    if not evaluated:
        return d
    tasks: dict[str, TaskResult] = {}
    if core_tasks is not None:
        for label, t in core_tasks.items():
            acc = sum(t["correct"]) / len(t["correct"])
            b = t["random_baseline"] / 100
            tasks[label] = TaskResult(label, "multiple_choice", len(t["correct"]), 0, t["random_baseline"], acc,
                                      (acc - b) / (1 - b), correct=list(t["correct"]), logprob=t.get("logprob"),
                                      bytes=t.get("bytes"), margin=t.get("margin"))  # fmt: skip
    elif core is not None:
        tasks["t1"] = TaskResult("t1", "multiple_choice", 10, 0, 25.0, 0.5, core)
    bundle = {"sha256": bundle_sha, "demo": True, "name": "demo", "tasks": list(tasks), "source": "x"}
    method = BpbMethod(WHOLE_DOCS, 64, 32)
    if per_doc is not None:
        nats, nbytes = per_doc
        bpb = sum(nats) / (math.log(2) * sum(nbytes))
        whole = BpbResult(method, bpb, len(nats) * 10, len(nats), int(sum(nbytes)), int(sum(nbytes)), list(nats),
                          [int(b) for b in nbytes])  # fmt: skip
    else:
        whole = BpbResult(method, bpb, 1000, 100, 4000, 4000)
    ckpt = d / "checkpoints" / f"step_{steps:06d}"
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "model.pt").write_bytes(f"weights of {d.name}".encode())
    result = EvalResult(
        run=d.name, checkpoint=CheckpointRef(steps, weights_sha256([ckpt / "model.pt"])),
        run_ended=now if state == "done" else None, eval_set=EvalSetRef(tiny_eval_set(wd), 100, 4000), bpb=whole,
        core=CoreResult(tasks, bundle) if tasks else None,
        checkpoints=[CheckpointScores(CheckpointRef(steps - len(history or []) + 1 + i, "x" * 64), bpb, tasks=h)
                     for i, h in enumerate(history or [])],
    )  # fmt: skip
    atomic_write_json(d / "eval.json", result.to_json())
    return d


def tiny_eval_set(wd: Any) -> str:
    """The workdir's eval set (one small shard, written once); its fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from armlab.evaluate.docs import eval_set_fingerprint

    if not list(wd.eval_dir.glob("shard_*.parquet")):  # a test may have written its own
        wd.eval_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": [f"eval document {i}" for i in range(4)]}), wd.eval_dir / "shard_00000.parquet")
        files = [{"name": "shard_00000.parquet", "rows": 4, "sha256": ""}]
        atomic_write_json(wd.eval_dir / "manifest.json", {"rows": 4, "files": files, "complete": True})
    return eval_set_fingerprint(wd.eval_dir)
