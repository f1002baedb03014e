"""One console and one progress style for every long step.

On a terminal: rich bars with count, rate, MB/s and ETA. Anywhere else (CI, `nohup`, a pipe, a
log file): plain lines, one when a step ends and one every `PLAIN_EVERY_S` seconds while it
runs, with the same figures, no colour and no cursor movement, so a log reads top to bottom.
Everything goes to stderr so that stdout stays parseable. Off a terminal the console never
wraps a message (rich would break lines at 80 columns mid-sentence); the log keeps one line per
message however long.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
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


class RateColumn(ProgressColumn):
    """Items per second, with the unit given as the task's `unit` field (docs/s, files/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


class BytesRateColumn(ProgressColumn):
    """MB/s from the task's `bytes` field (updated alongside completed items)."""

    def render(self, task: Task) -> Text:
        nbytes = task.fields.get("bytes")
        elapsed = task.finished_time if task.finished else task.elapsed
        if not nbytes or not elapsed:
            return Text("")
        return Text(f"{nbytes / elapsed / 1e6:,.1f} MB/s", style="progress.data.speed")


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

    def line(self, now: float) -> str:
        unit = self.fields.get("unit", "it")
        elapsed = max(now - self.start, 1e-9)
        n = f"{self.completed:,.0f}" + (f"/{self.total:,.0f}" if self.total else "")
        parts = [f"{self.description}: {n} {unit}"]
        if self.total:
            parts[0] += f" ({100 * self.completed / self.total:.0f}%)"
        rate = self.completed / elapsed
        parts.append(f"{rate:,.1f} {unit}/s" if rate < 10 else f"{rate:,.0f} {unit}/s")
        if self.fields.get("bytes"):
            parts.append(f"{self.fields['bytes'] / elapsed / 1e6:,.1f} MB/s")
        parts.append(f"{_clock(elapsed)} elapsed")
        if self.total and not self.done and rate > 0:
            parts.append(f"eta {_clock((self.total - self.completed) / rate)}")
        return ", ".join(parts)


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


def progress(transient: bool = False) -> Progress | PlainProgress:
    """Bars on a terminal, plain lines elsewhere: `with progress() as p: t = p.add_task(...)`."""
    if not console.is_terminal:
        return PlainProgress(console, transient=transient)
    return Progress(
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
