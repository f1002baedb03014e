"""Commands and files on another machine over SSH, through the system OpenSSH client.

Shelling out to `ssh` (rather than an SSH library) means everything the user already set up
just works: ~/.ssh/config aliases, ProxyJump, keys, ssh-agent, known_hosts. armlab never asks
for or stores a password: `BatchMode=yes` makes a host that wants one fail at once with an
authentication error instead of hanging on a prompt. `ARMLAB_SSH_CONFIG` points ssh at another
config file (`ssh -F`), which is how the tests aim armlab at their own sshd instances.

Every connection problem becomes one `ArmlabError` line naming the host and saying what to do.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from armlab.errors import ArmlabError
from armlab.spec import HostSpec

SSH_CONFIG_ENV = "ARMLAB_SSH_CONFIG"
CONNECT_TIMEOUT_ENV = "ARMLAB_SSH_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10

# The launcher's interpreter on a host set up by `armlab setup` (a venv in the remote home).
DEFAULT_REMOTE_PYTHON = "~/.armlab/venv/bin/python"


def rpath(path: str) -> str:
    """Quote a remote path for the remote POSIX shell, keeping a leading `~/` expandable."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


def _ssh_error(name: str, target: str, stderr: str, timeout: int) -> str:
    """One line for a failed connection (ssh exit 255), from OpenSSH's own message."""
    lines = [
        ln.strip()
        for ln in stderr.splitlines()
        if ln.strip() and not ln.startswith("Warning: Permanently added")
    ]
    last = lines[-1] if lines else "ssh exited with status 255"
    low = stderr.lower()
    where = f"host {name!r} ({target})"
    if "permission denied" in low or "too many authentication failures" in low:
        return (
            f"{where}: SSH authentication failed ({last}); armlab uses keys only: "
            f"run `ssh-copy-id {target}` or load your key into ssh-agent, then `ssh {target} true`"
        )
    if "timed out" in low:
        return f"{where}: unreachable (no answer within {timeout}s); check the address, VPN/firewall, and `ssh {target} true`"
    if "connection refused" in low:
        return f"{where}: connection refused ({last}); is sshd running there, and is the port right?"
    if "could not resolve hostname" in low or "name or service not known" in low:
        return f"{where}: unknown host name ({last}); fix 'ssh' in [[hosts]] or add a Host entry to ~/.ssh/config"
    if "host key verification failed" in low or "remote host identification has changed" in low:
        return f"{where}: host key verification failed; check the host's key, then fix ~/.ssh/known_hosts"
    if "network is unreachable" in low or "no route to host" in low:
        return f"{where}: unreachable ({last}); check the address and your network"
    return f"{where}: SSH failed: {last}"


@dataclass(frozen=True)
class Remote:
    """One SSH target: `target` is `user@host`, `host`, or a Host alias from the ssh config."""

    name: str
    target: str
    port: int | None = None

    @classmethod
    def from_spec(cls, host: HostSpec) -> Remote:
        if host.target is None:
            raise ArmlabError(f"host {host.name!r}: no ssh target (it runs on this machine)")
        return cls(name=host.name, target=host.target, port=host.port)

    @property
    def connect_timeout(self) -> int:
        raw = os.environ.get(CONNECT_TIMEOUT_ENV, "")
        return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_CONNECT_TIMEOUT

    def ssh_argv(self) -> list[str]:
        argv = [
            "ssh",
            "-o", "BatchMode=yes",  # never prompt for a password or passphrase
            "-o", f"ConnectTimeout={self.connect_timeout}",
            "-o", "ServerAliveInterval=15",
            "-o", "ServerAliveCountMax=4",
        ]  # fmt: skip
        config = os.environ.get(SSH_CONFIG_ENV)
        if config:
            argv += ["-F", config]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        return argv

    def run(
        self,
        command: str,
        *,
        input: bytes | None = None,
        timeout: float | None = None,
        check: bool = True,
        what: str | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell command on the host; stdout/stderr captured as bytes.

        Connection failures raise ArmlabError; with `check`, so does a non-zero exit, quoting
        the last line of the remote stderr.
        """
        argv = [*self.ssh_argv(), self.target, "--", command]
        try:
            p = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
            )
        except FileNotFoundError:
            raise ArmlabError("the OpenSSH client `ssh` is not installed; install openssh-client") from None
        except subprocess.TimeoutExpired:
            raise ArmlabError(
                f"host {self.name!r}: {what or 'remote command'} did not finish within {timeout:.0f}s"
            ) from None
        if p.returncode == 255:
            raise ArmlabError(
                _ssh_error(self.name, self.target, p.stderr.decode(errors="replace"), self.connect_timeout)
            )
        if check and p.returncode != 0:
            err = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln.strip()]
            tail = err[-1].strip() if err else f"exit status {p.returncode}"
            raise ArmlabError(f"host {self.name!r}: {what or 'remote command'} failed: {tail}")
        return p

    def stream(self, command: str, input: bytes | None = None) -> int:
        """Run a command with its output going straight to our stdout/stderr (for `logs -f`)."""
        argv = [*self.ssh_argv(), self.target, "--", command]
        stdin = None if input is not None else subprocess.DEVNULL
        p = subprocess.run(argv, input=input, stdin=stdin, stderr=subprocess.PIPE)
        if p.returncode == 255:
            raise ArmlabError(
                _ssh_error(self.name, self.target, p.stderr.decode(errors="replace"), self.connect_timeout)
            )
        if p.stderr:
            os.write(2, p.stderr)
        return p.returncode

    def put(self, local: Path, remote_path: str, mode: str = "644") -> None:
        """Copy a file to the host atomically (temp name, then rename), creating its directory."""
        self._write(Path(local).read_bytes(), remote_path, mode, f"copying {Path(local).name}")

    def put_text(self, text: str, remote_path: str) -> None:
        self._write(text.encode(), remote_path, "644", f"writing {remote_path}")

    def _write(self, data: bytes, remote_path: str, mode: str, what: str) -> None:
        q = rpath(remote_path)
        # `$$` is the remote shell's pid: concurrent writers of one path never share a temp name.
        tmp = rpath(remote_path + ".armlab-tmp") + ".$$"
        cmd = f'mkdir -p "$(dirname {q})" && cat > {tmp} && chmod {mode} {tmp} && mv -f {tmp} {q}'
        self.run(cmd, input=data, what=what)

    def resolve(self) -> tuple[str, int]:
        """(hostname, port) this target connects to, from `ssh -G` (reads the config, no connection)."""
        argv = [*self.ssh_argv(), "-G", self.target]
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except FileNotFoundError:
            raise ArmlabError("the OpenSSH client `ssh` is not installed; install openssh-client") from None
        if p.returncode != 0:
            raise ArmlabError(
                f"host {self.name!r}: cannot read the SSH config for {self.target!r}: {p.stderr.strip()}"
            )
        opts: dict[str, str] = {}
        for line in p.stdout.splitlines():
            key, _, value = line.partition(" ")
            opts.setdefault(key.lower(), value.strip())
        return opts.get("hostname", self.target), int(opts.get("port", "22"))
