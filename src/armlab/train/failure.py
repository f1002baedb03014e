"""Why the ranks of a run failed, in one line: the rank at fault, not the ranks that lost it.

When one rank dies, the others fail too, each with its own error: a rank killed by SIGKILL (the
kernel's OOM killer, a kill -9) leaves no error file at all, and its peers then fail in their next
collective ("Connection closed by peer"). Blaming the first error file would name a rank that only
lost its peer. So the cause is, in order: the rank torchrun reports as the root cause (its "first
observed failure") when that rank left no error of its own (killed by a signal, or exited with no
exception); else the earliest error that is not a lost peer; else the earliest error; else the
launcher's own last error line.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass

from armlab.runs import RankError

# What a rank's error says when it failed only because a peer went away (gloo, NCCL, the store).
PEER_LOST = re.compile(
    r"Connection closed by peer|Connection reset by peer|Broken pipe|remote process exited|"
    r"NCCL communicator was aborted|ProcessGroupNCCL.*(?:timeout|abort)|DistNetworkError|"
    r"Socket Timeout|recvBytes|sendBytes|failed to recv|Connection refused",
    re.IGNORECASE,
)
_ROOT = re.compile(r"^\s*Root Cause \(first observed failure\)")
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


@dataclass(frozen=True)
class RankExit:
    """One failed rank as torchrun's failure summary lists it."""

    rank: int
    exitcode: int

    def describe(self) -> str:
        if self.exitcode < 0:
            try:
                name = signal.Signals(-self.exitcode).name
            except ValueError:
                name = f"signal {-self.exitcode}"
            hint = " (the kernel's OOM killer, or a kill -9)" if name == "SIGKILL" else ""
            return f"rank {self.rank} was killed by {name}{hint}"
        return f"rank {self.rank} exited with code {self.exitcode} without an error"


def root_cause(lines: Iterable[str]) -> RankExit | None:
    """The rank torchrun calls the root cause of a failure (its summary's "Root Cause" entry)."""
    in_root, rank = False, None
    for line in lines:
        if _ROOT.match(line):
            in_root, rank = True, None
        elif in_root and (m := _RANK.match(line)):
            rank = int(m.group(1))
        elif in_root and rank is not None and (m := _EXIT.match(line)):
            return RankExit(rank, int(m.group(1)))
    return None


def error_line(lines: Iterable[str]) -> str | None:
    """The last line of the ranks' output that names an error: torchrun's own failures (a rendezvous
    that could not bind, a rank killed by a signal) and engines whose ranks write no rank error
    file leave only this."""
    found = None
    for line in lines:
        line = line.strip()
        if any(k in line for k in ("Error", "error:", "Exception", "received by PID")):
            found = line
    return found[:300] if found else None


@dataclass(frozen=True)
class Cause:
    rank: int | None
    line: str  # the one line for the user
    bad_input: bool = False  # a rank refused bad input (an ArmlabError): exit 2


def failure_cause(errors: list[RankError], output: list[str], detail: str) -> Cause:
    """The one cause of a failed run (see the module docstring). `errors`: the rank error files,
    earliest first; `output`: the last lines the ranks and torchrun printed; `detail`: how the
    launcher ended ("exit code 1", "killed by SIGKILL")."""
    by_rank = {e.rank: e for e in errors}
    root = root_cause(output)
    if root is not None and root.rank not in by_rank:
        lost = [str(e.rank) for e in errors]
        after = (
            f"; then rank {', '.join(lost)} lost {'their' if len(lost) > 1 else 'its'} peer" if lost else ""
        )
        return Cause(root.rank, root.describe() + after)
    if errors:
        first = next((e for e in errors if not PEER_LOST.search(e.error)), errors[0])
        if PEER_LOST.search(first.error):
            return Cause(
                first.rank, f"rank {first.rank} lost its peers ({first.error}): a rank or node died first"
            )
        if first.kind == "bad_input":  # a rank refused its input (an ArmlabError): its line, as is
            return Cause(first.rank, first.error, bad_input=True)
        return Cause(first.rank, f"rank {first.rank} failed: {first.error}")
    cause = error_line(output)
    return Cause(None, f"training processes failed ({detail}){': ' + cause if cause else ''}")
