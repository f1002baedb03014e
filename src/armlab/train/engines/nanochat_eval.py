"""`armlab evaluate` for a nanochat run: nanochat's own numbers, into armlab's eval.json fields.

- val bpb: what nanochat's base_train measured at its last step on the run's val file, which is
  the experiment's shared eval set (armlab.train.engines.nanochat_layout): the final
  `Step N | Validation bpb` record of metrics.jsonl. Evaluated by the code that trained the
  model, on the same documents for every arm.
- CORE: the checkout's `scripts.base_eval --eval core` on the final checkpoint, with the
  experiment's bundle linked where base_eval looks for it (`<base dir>/eval_bundle`, so it never
  downloads its own), read back from the CSV it writes (`base_eval/base_model_<step>.csv`: per
  task accuracy and centered score, then the CORE row). base_eval reports no per-item results,
  so `core_tasks[label]` has `accuracy`, `centered`, `random_baseline` and `n` but no `correct`.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
from pathlib import Path
from typing import Any

from armlab import runs
from armlab.errors import ArmlabError, RunFailed
from armlab.train.engines.nanochat_layout import BaseDir, place_bundle

BASE_EVAL_TIMEOUT_S = 24 * 3600


def final_val_bpb(run_dir: Path, step: int) -> float:
    """nanochat's own val bpb at the final step (refuses a run that never logged one)."""
    vals = [
        m for m in runs.read_metrics(run_dir).records if m.get("val_bpb") is not None and m["step"] == step
    ]
    if not vals:
        raise ArmlabError(
            f"{run_dir / runs.METRICS_JSONL}: no 'Validation bpb' of step {step} from nanochat; its final eval "
            f"did not run or was not logged (see {run_dir / runs.TRAIN_LOG}); retrain the run"
        )
    return float(vals[-1]["val_bpb"])


def read_core_csv(path: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """(CORE, {label: {accuracy, centered}}) from base_eval's CSV (`Task, Accuracy, Centered` rows)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = [[c.strip() for c in row] for row in csv.reader(f) if row]
    except FileNotFoundError:
        raise ArmlabError(f"{path}: scripts.base_eval wrote no results") from None
    tasks: dict[str, dict[str, float]] = {}
    core = None
    for row in rows[1:]:
        if row[0] == "CORE":
            core = float(row[2])
        elif len(row) >= 3:
            tasks[row[0]] = {"accuracy": float(row[1]), "centered": float(row[2])}
    if core is None or not tasks:
        raise ArmlabError(f"{path}: no CORE row in scripts.base_eval's results")
    return core, tasks


def run_base_eval(
    checkout: Path,
    python: Path,
    base: BaseDir,
    model_tag: str,
    step: int,
    device: str,
    max_per_task: int | None,
    log: Path,
) -> Path:
    """Run the checkout's scripts.base_eval (CORE only) on one checkpoint; its output is appended to `log`."""
    argv = [str(python), "-m", "scripts.base_eval", "--eval", "core", f"--model-tag={model_tag}", f"--step={step}",
            f"--device-type={device}", f"--max-per-task={max_per_task if max_per_task else -1}"]  # fmt: skip
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base.root), "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        out.write(f"armlab evaluate: {' '.join(argv)}\n".encode())
        out.flush()
        try:
            p = subprocess.run(argv, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=BASE_EVAL_TIMEOUT_S)  # fmt: skip
        except OSError as e:
            raise ArmlabError(f"cannot run {python} for nanochat's base_eval: {e.strerror}") from None
    if p.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        raise RunFailed(
            f"nanochat's scripts.base_eval failed (exit code {p.returncode}){': ' + tail[0] if tail else ''}; "
            f"see {log}"
        )
    return base.base_eval_csv(step)


def evaluate_core(
    checkout: Path,
    python: Path,
    run_dir: Path,
    model_tag: str,
    step: int,
    bundle: Any,
    device: str,
    max_per_task: int | None,
) -> dict[str, Any]:
    """eval.json's CORE fields from nanochat's base_eval on the run's checkpoint at `step`."""
    base = BaseDir.of_run(run_dir)
    place_bundle(base, bundle.root)
    base.base_eval_csv(step).unlink(missing_ok=True)  # never read an older evaluation's results
    csv_path = run_base_eval(checkout, python, base, model_tag, step, device, max_per_task,
                             run_dir / "evaluate.log")  # fmt: skip
    core, tasks = read_core_csv(csv_path)
    known = {t.label: t for t in bundle.tasks}
    out: dict[str, dict[str, Any]] = {}
    for label, scores in tasks.items():
        task = known.get(label)
        if task is None:
            raise ArmlabError(f"{csv_path}: task {label!r} is not in the bundle {bundle.source}")
        n = len(bundle.load_items(task))
        out[label] = {
            **scores,
            "n": min(n, max_per_task) if max_per_task else n,
            "type": task.task_type,
            "num_fewshot": task.num_fewshot,
            "random_baseline": task.random_baseline,
        }
    if not math.isfinite(core):
        raise RunFailed(f"{csv_path}: CORE is {core}")
    return {"core": core, "core_tasks": out, "bundle": bundle.describe()}
