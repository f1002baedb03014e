"""How the orchestrator reaches a host's side: a shell (this machine's, or SSH's) and the agent
behind it.

`Shell` is what `armlab.ops.ssh.Remote` already is (run a command, stream one, write a file);
`LocalShell` is the same on this machine (a Slurm login node armlab runs on). `ShellAgent` calls
the host-side agent (armlab.ops.hosts.agent) through a shell with a typed request and reads its
typed answer; `LocalAgent` calls it in this process.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from typing import Protocol

from armlab.errors import ArmlabError
from armlab.ops.hosts import agent
from armlab.ops.hosts.messages import LogsRequest
from armlab.ops.ssh import rpath
from armlab.records import Record
from armlab.spec import Experiment
from armlab.workdir import atomic_write_text


class Shell(Protocol):
    name: str

    def run(
        self,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        what: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]: ...

    def stream(self, command: str, input: bytes | None = None) -> int: ...

    def put_text(self, text: str, remote_path: str) -> None: ...


class LocalShell:
    """This machine's shell, with `Remote`'s contract: a failing command (with `check`) is one
    ArmlabError line quoting its last stderr line."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(
        self,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        what: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        try:
            p = subprocess.run(
                ["bash", "-c", command], input=input, capture_output=True, timeout=timeout,
                stdin=None if input is not None else subprocess.DEVNULL,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ArmlabError(
                f"host {self.name!r}: {what or 'command'} did not finish within {timeout:.0f}s"
            ) from None
        if check and p.returncode != 0:
            raise ArmlabError(f"host {self.name!r}: {what or 'command'} failed: {last_line(p)}")
        return p

    def stream(self, command: str, input: bytes | None = None) -> int:
        return subprocess.run(["bash", "-c", command], input=input).returncode

    def put_text(self, text: str, remote_path: str) -> None:
        atomic_write_text(Path(os.path.expanduser(remote_path)), text)


def last_line(p: subprocess.CompletedProcess[bytes]) -> str:
    """The last non-empty stderr line of a finished command (else its exit status)."""
    err = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln.strip()]
    return err[-1].strip().removeprefix("armlab: error: ") if err else f"exit status {p.returncode}"


def python_cmd(python: str, *words: str) -> str:
    """`python WORDS...` for a POSIX shell (paths starting `~/` stay expandable there)."""
    quoted = [rpath(w) if w.startswith("~/") else shlex.quote(w) for w in words]
    return " ".join([rpath(python), *quoted])


def armlab_cmd(python: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Shell command running a host's armlab CLI with `args`."""
    code = "import sys; sys.argv[0] = 'armlab'; from armlab.cli import main; main()"
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    return prefix + python_cmd(python, "-c", code, *args)


class LocalAgent:
    """The agent in this process, on the host's experiment."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def call(self, op: str, request: Record, timeout: float | None = None) -> Record | None:
        return agent.call(op, self.exp, request)

    def stream(self, op: str, request: LogsRequest) -> int:
        """`logs` here: `tail` as a child of this process (Ctrl-C ends it, quietly)."""
        if op != "logs":
            raise ValueError(f"agent op {op} does not stream")
        path = agent.log_path(self.exp, request.arm, request.run)
        try:
            return subprocess.run(agent.tail_argv(path, request.lines, request.follow)).returncode
        except KeyboardInterrupt:
            return 0


class ShellAgent:
    """The agent on the other side of a shell: `python -m armlab.ops.hosts.agent OP EXP_PATH`."""

    def __init__(self, shell: Shell, python: str, exp_path: str) -> None:
        self.shell, self.python, self.exp_path = shell, python, exp_path

    def command(self, op: str) -> str:
        return python_cmd(self.python, "-m", "armlab.ops.hosts.agent", op, self.exp_path)

    def call(self, op: str, request: Record, timeout: float | None = 600) -> Record | None:
        body = json.dumps(request.to_json()).encode()
        p = self.shell.run(self.command(op), input=body, check=False, timeout=timeout, what=f"armlab {op}")
        out = p.stdout.decode(errors="replace").strip().splitlines()
        answer = agent.lookup(op)[2]
        if p.returncode != 0 or (answer is not None and not out):
            tail = last_line(p)
            if p.returncode == 127 or any(k in tail for k in ("No such file", "ModuleNotFoundError", "ImportError")):
                raise ArmlabError(
                    f"host {self.shell.name!r}: armlab is not installed there ({tail}); "
                    f"run `armlab setup EXP --host {self.shell.name}`"
                )
            raise ArmlabError(f"host {self.shell.name!r}: armlab {op} failed: {tail}")
        if answer is None:
            return None
        try:
            data = json.loads(out[-1])
        except ValueError:
            raise ArmlabError(f"host {self.shell.name!r}: armlab {op} answered {out[-1][:200]!r}, not JSON") from None
        return answer.from_json(data, f"host {self.shell.name!r}: armlab {op}")

    def stream(self, op: str, request: Record) -> int:
        return self.shell.stream(self.command(op), json.dumps(request.to_json()).encode())
