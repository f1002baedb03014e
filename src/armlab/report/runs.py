"""Reading a run dir (run.json, state.json, metrics.jsonl, eval.json), for status and compare.

Readers are tolerant where a live writer may be mid-line (the last line of metrics.jsonl) and
strict where a file should be whole (run.json, written atomically): a torn run.json is an error
naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from armlab.errors import ArmlabError
from armlab.workdir import read_json


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON line of metrics.jsonl (a half-written last line is skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def read_optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if Path(path).is_file() else None


@dataclass
class RunRecord:
    dir: Path
    info: dict[str, Any]  # run.json
    state: dict[str, Any] | None  # state.json
    metrics: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None  # eval.json

    @property
    def arm(self) -> str:
        return str(self.info.get("arm", self.dir.parent.parent.name))

    @property
    def run(self) -> str:
        return str(self.info.get("run", self.dir.name))

    @property
    def seed(self) -> int:
        return int(self.info.get("seed", 0))

    @property
    def state_name(self) -> str:
        return str((self.state or {}).get("state", "starting"))

    @property
    def train_lines(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if "train_loss" in m]

    @property
    def eval_lines(self) -> list[dict[str, Any]]:
        return [m for m in self.metrics if m.get("val_bpb") is not None]

    @property
    def final_val_bpb(self) -> float | None:
        if self.eval and self.eval.get("val_bpb") is not None:
            return float(self.eval["val_bpb"])
        lines = self.eval_lines
        return float(lines[-1]["val_bpb"]) if lines else None

    @property
    def core(self) -> float | None:
        return None if not self.eval or self.eval.get("core") is None else float(self.eval["core"])

    @property
    def tokens(self) -> int | None:
        last = self.metrics[-1] if self.metrics else None
        return int(last["tokens"]) if last and "tokens" in last else None

    @property
    def epoch(self) -> float | None:
        lines = [m for m in self.train_lines if m.get("epoch") is not None]
        return float(lines[-1]["epoch"]) if lines else None

    @property
    def train_time_s(self) -> float | None:
        """Wall time from start to end (state.json), else the last metrics line's elapsed time."""
        st = self.state or {}
        if st.get("started") and st.get("ended"):
            return float(st["ended"]) - float(st["started"])
        return float(self.metrics[-1]["time"]) if self.metrics and "time" in self.metrics[-1] else None


def load_run(run_dir: Path) -> RunRecord:
    run_dir = Path(run_dir)
    try:
        info = read_json(run_dir / "run.json")
    except FileNotFoundError:
        raise ArmlabError(f"{run_dir}: not a run dir (no run.json)") from None
    if not isinstance(info, dict):
        raise ArmlabError(f"{run_dir / 'run.json'}: expected a JSON object")
    state = read_optional_json(run_dir / "state.json")
    return RunRecord(
        dir=run_dir,
        info=info,
        state=state,
        metrics=read_metrics(run_dir / "metrics.jsonl"),
        eval=read_optional_json(run_dir / "eval.json"),
    )
