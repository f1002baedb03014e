"""One console and one progress style for every long step.

On a terminal: rich bars with count, rate, MB/s and ETA. Anywhere else (CI, `nohup`, a pipe, a
log file): plain lines, one when a step ends and one every `PLAIN_EVERY_S` seconds while it
runs, with the same figures, no colour and no cursor movement, so a log reads top to bottom.
Everything goes to stderr so that stdout stays parseable. Off a terminal the console never
wraps a message (rich would break lines at 80 columns mid-sentence); the log keeps one line per
message however long.

Per node: an executor that runs units on several machines (Ray) calls each unit's `on_done`
inside `on_node(address)`; every update made there is also counted for that node, shown as one
row per node under the bar (a terminal) or as `per node:` figures on the plain line. The passes
themselves know nothing of nodes.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, highlight=False)
if not console.is_terminal:
    console.soft_wrap = True  # one message, one line: never folded at 80 columns

# Seconds between plain progress lines (ARMLAB_PROGRESS_EVERY overrides: tests, chatty CI logs).
PLAIN_EVERY_S = float(os.environ.get("ARMLAB_PROGRESS_EVERY", "30"))


COUNTED = ("docs", "bytes")  # cumulative task fields shown as rates: docs/s (beside files/s), MB/s


def _per_s(n: float, seconds: float, unit: str) -> str:
    rate = n / max(seconds, 1e-9)
    return f"{rate:,.1f} {unit}/s" if rate < 10 else f"{rate:,.0f} {unit}/s"


def _figures(items: float, unit: str, counts: dict[str, Any], seconds: float) -> list[str]:
    """The rates of `items` of `unit` and of the COUNTED fields over `seconds`."""
    out = [_per_s(items, seconds, unit)]
    if unit != "docs" and counts.get("docs"):
        out.append(_per_s(counts["docs"], seconds, "docs"))
    if counts.get("bytes"):
        out.append(f"{counts['bytes'] / max(seconds, 1e-9) / 1e6:,.1f} MB/s")
    return out


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task's `unit` field (docs/s, files/s), and
    docs/s from a `docs` field when the unit is something else (files)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        text = f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s"
        elapsed = task.finished_time if task.finished else task.elapsed
        if unit != "docs" and task.fields.get("docs") and elapsed:
            text += f" {_per_s(task.fields['docs'], elapsed, 'docs')}"
        return Text(text, style="progress.data.speed")


class BytesRateColumn(ProgressColumn):
    """MB/s from the task's `bytes` field (updated alongside completed items)."""

    def render(self, task: Task) -> Text:
        nbytes = task.fields.get("bytes")
        elapsed = task.finished_time if task.finished else task.elapsed
        if not nbytes or not elapsed:
            return Text("")
        return Text(f"{nbytes / elapsed / 1e6:,.1f} MB/s", style="progress.data.speed")


_NODE: ContextVar[str | None] = ContextVar("armlab_progress_node", default=None)


@contextlib.contextmanager
def on_node(node: str) -> Iterator[None]:
    """Progress updates made inside this block count for `node` too (a unit's result from it)."""
    token = _NODE.set(node)
    try:
        yield
    finally:
        _NODE.reset(token)


@dataclass
class NodeTally:
    """What one node has done for one progress task: items, the COUNTED fields, units (updates)."""

    items: float = 0
    counts: dict[str, float] = field(default_factory=dict)
    units: int = 0

    def add(self, completed: float, fields: dict[str, Any], update: dict[str, Any]) -> None:
        """Count one update (`advance`, or an absolute `completed`, and new values of the
        cumulative COUNTED fields) of a task that stood at `completed` with `fields`."""
        if update.get("advance") is not None:
            self.items += update["advance"]
        elif update.get("completed") is not None:
            self.items += update["completed"] - completed
        for k in COUNTED:
            if update.get(k) is not None:
                self.counts[k] = self.counts.get(k, 0) + update[k] - (fields.get(k) or 0)
        self.units += 1


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


@dataclass
class _PlainTask:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    start: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)
    done: bool = False
    nodes: dict[str, NodeTally] = field(default_factory=dict)

    def line(self, now: float) -> str:
        unit = self.fields.get("unit", "it")
        elapsed = max(now - self.start, 1e-9)
        n = f"{self.completed:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        parts = [f"{self.description}: {n} {unit}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        rate = self.completed / elapsed
        parts += _figures(self.completed, unit, self.fields, elapsed)
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and not self.done and rate > 0:
            parts.append(f"eta {_clock((self.total - self.completed) / rate)}")
        line = ", ".join(parts)
        if self.nodes:
            per = [
                " ".join([node, *_figures(n.items, unit, n.counts, elapsed)])
                + f" ({n.units:,} {'unit' if n.units == 1 else 'units'})"
                for node, n in sorted(self.nodes.items())
            ]
            line += "; per node: " + ", ".join(per)
        return line


class PlainProgress:
    """The part of rich's `Progress` interface armlab uses (add_task, update, advance), printing
    plain lines: when a task completes, and at most every `every` seconds while it runs.
    `transient` tasks (short steps) print only the periodic lines, never a final one."""

    def __init__(self, console: Console, transient: bool = False, every: float | None = None):
        self.console = console
        self.transient = transient
        self.every = PLAIN_EVERY_S if every is None else every
        self._tasks: list[_PlainTask] = []
        self._lock = threading.Lock()  # updates come from worker threads (downloads, uploads)

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0, **fields: Any) -> int:
        with self._lock:
            self._tasks.append(_PlainTask(description, total, completed, dict(fields)))
            return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        with self._lock:
            t = self._tasks[task_id]
            if (node := _NODE.get()) is not None:
                update = {"completed": completed, "advance": advance, **fields}
                t.nodes.setdefault(node, NodeTally()).add(t.completed, t.fields, update)
            if total is not None:
                t.total = total
            if completed is not None:
                t.completed = completed
            if advance is not None:
                t.completed += advance
            if description is not None:
                t.description = description
            t.fields.update(fields)
            now = time.monotonic()
            finished = t.total is not None and t.completed >= t.total and not t.done
            if finished:
                t.done = True
            if (finished and not self.transient) or (not finished and now - t.last_line >= self.every):
                t.last_line = now
                self.console.print(t.line(now), markup=False, highlight=False, soft_wrap=True)


class Bars(Progress):
    """rich's Progress, plus one row per node under a task whose units ran on several nodes."""

    def __init__(self, *columns: Any, **kw: Any):
        super().__init__(*columns, **kw)
        self._node_rows: dict[tuple[TaskID, str], TaskID] = {}

    def update(self, task_id: TaskID, **kw: Any) -> None:
        node = _NODE.get()
        if node is not None:
            t = self._tasks[task_id]
            tally = NodeTally()
            tally.add(t.completed, t.fields, kw)
            key = (task_id, node)
            if key not in self._node_rows:
                self._node_rows[key] = self.add_task(f"  {node}", total=None, unit=t.fields.get("unit", "it"))
            row = self._tasks[self._node_rows[key]]
            counts = {k: (row.fields.get(k) or 0) + v for k, v in tally.counts.items()}
            super().update(row.id, advance=tally.items, **counts)
        super().update(task_id, **kw)


def progress(transient: bool = False) -> Progress | PlainProgress:
    """Bars on a terminal, plain lines elsewhere: `with progress() as p: t = p.add_task(...)`."""
    if not console.is_terminal:
        return PlainProgress(console, transient=transient)
    return Bars(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        BytesRateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def byte_counter(bar: Progress | PlainProgress, task: int, also_completed: bool = False) -> Any:
    """`on_bytes(n)` for threads that move bytes together: adds `n` to the task's `bytes` field
    (and to its count, `also_completed`, for a task counted in bytes)."""
    lock = threading.Lock()
    moved = 0

    def on_bytes(n: int) -> None:
        nonlocal moved
        with lock:
            moved += n
            bar.update(task, bytes=moved, **({"completed": moved} if also_completed else {}))

    return on_bytes
