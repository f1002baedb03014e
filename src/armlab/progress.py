"""One console and one progress-bar style for every long step (rich: rate, MB/s, ETA).

Bars go to stderr so that stdout stays parseable; on a non-terminal (CI, nohup logs) rich
degrades to periodic plain lines instead of redraws.
"""

from __future__ import annotations

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


def progress(transient: bool = False) -> Progress:
    """A rich Progress with count, rate, MB/s and ETA columns: `with progress() as p: ...`."""
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
        # a transient bar vanishes when done; off a terminal it would only leave a blank line
        disable=transient and not console.is_terminal,
    )
