"""Real OpenSSH servers on loopback for the remote tests: two sshd instances = two "hosts".

Each instance is Debian's `/usr/sbin/sshd -D -e` with a generated host key, on a free loopback
port, accepting one generated client key for the current user. A generated ssh_config gives
them Host aliases (`hosta`, `hostb`), and one more alias `badkey` that offers a key the servers
do not accept (for the authentication-failure test). armlab finds that config through
`ARMLAB_SSH_CONFIG`. No sshd installed is a failure ("run scripts/test.sh"), never a skip.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def host_venv(venv: Path) -> Path:
    """A test host's Python environment, made from what the project installs: a bare venv (no
    pip, no system site packages) plus a `.pth` file that appends the site-packages dirs this
    interpreter sees, so the host finds torch, typer, ... without a download, whatever the base
    interpreter has. armlab itself stays out of reach: a directory named in a `.pth` file is
    only put on sys.path, its own `.pth` files (the project's editable install) are not run, so
    the host imports armlab only once `armlab setup` has installed the wheel. The host's pip is
    the project's, through the same path; it installs into the host venv (sys.prefix).

    Why not `--system-site-packages`: that shows the *base* interpreter's packages, which on a
    fresh machine have none of armlab's dependencies (0.1's remote tests passed only where they
    were installed). Why not a wheelhouse: torch alone is ~1 GB to repack per host."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "_armlab_test_host.pth").write_text("".join(f"{d}\n" for d in site_dirs))
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(n: int) -> int:
    """A port P with P .. P+n-1 all free now, below Linux's ephemeral range (32768-60999) so that
    no outgoing connection of a parallel test takes one of them in the meantime (a `[[hosts]]`
    master_port P gives lane k the port P + k)."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 32000 - n)
        try:
            with contextlib.ExitStack() as stack:
                for k in range(n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports in 20000-32000")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@dataclass
class SshHosts:
    root: Path
    config: Path
    ports: dict[str, int]  # alias -> sshd port
    procs: list[subprocess.Popen]

    def ssh(self, alias: str, command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", "-F", str(self.config), alias, "--", command], capture_output=True, text=True, timeout=30
        )


def _start_sshd(
    root: Path, name: str, host_key: Path, authorized: Path, env: dict[str, str]
) -> tuple[subprocess.Popen, int]:
    for _ in range(5):  # a free port can be taken between probe and bind: retry on another
        port = free_port()
        conf = root / f"sshd_{name}.conf"
        conf.write_text(
            "\n".join(
                [
                    f"Port {port}",
                    "ListenAddress 127.0.0.1",
                    f"HostKey {host_key}",
                    f"AuthorizedKeysFile {authorized}",
                    f"PidFile {root / f'sshd_{name}.pid'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "LogLevel ERROR",
                    # The test hosts' sessions as the test process itself (conftest.py): one thread
                    # a rank (the "hosts" share this machine's cores), and gloo on loopback (it binds
                    # the address the hostname resolves to unless told; two "nodes" of one run too)
                    "SetEnv " + " ".join(f"{k}={v}" for k, v in {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **env}.items()),
                    "",
                ]
            )
        )
        log = open(root / f"sshd_{name}.log", "wb")  # noqa: SIM115  (kept open for the server's life)
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stdout=log, stderr=log)
        deadline = time.time() + 10
        while time.time() < deadline and proc.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc, port
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"sshd {name} did not start: {(root / f'sshd_{name}.log').read_text()}")


@contextlib.contextmanager
def sshd_hosts(
    root: Path, aliases: tuple[str, ...] = ("hosta", "hostb"), env: dict[str, str] | None = None
) -> Iterator[SshHosts]:
    """`env`: more variables every session gets (e.g. SLURM_CONF: a Slurm login node's clients)."""
    if not Path(SSHD).exists():
        pytest.fail("sshd not found (/usr/sbin/sshd): run scripts/test.sh, which installs openssh-server")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.fail("the OpenSSH client is not installed: run scripts/test.sh, which installs openssh-client")
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation dir
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key, bad_key = root / "host_ed25519", root / "client_ed25519", root / "bad_ed25519"
    for k in (host_key, client_key, bad_key):
        _keygen(k)
    authorized = root / "authorized_keys"
    authorized.write_text((root / "client_ed25519.pub").read_text())
    authorized.chmod(0o600)

    procs: list[subprocess.Popen] = []
    ports: dict[str, int] = {}
    try:
        for alias in aliases:
            proc, port = _start_sshd(root, alias, host_key, authorized, env or {})
            procs.append(proc)
            ports[alias] = port
        user = getpass.getuser()
        entries = [(alias, port, client_key) for alias, port in ports.items()]
        entries.append(("badkey", ports[aliases[0]], bad_key))
        config = root / "ssh_config"
        config.write_text(
            "".join(
                f"Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  User {user}\n  IdentityFile {key}\n"
                f"  IdentitiesOnly yes\n  IdentityAgent none\n  StrictHostKeyChecking accept-new\n"
                f"  UserKnownHostsFile {root / 'known_hosts'}\n  LogLevel ERROR\n\n"
                for alias, port, key in entries
            )
        )
        hosts = SshHosts(root=root, config=config, ports=ports, procs=procs)
        for alias in aliases:  # sshd accepts connections before it is fully ready: wait for a real login
            deadline = time.time() + 15
            while True:
                r = hosts.ssh(alias, "true")
                if r.returncode == 0:
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"cannot log in to sshd {alias}: {r.stderr.strip()}")
                time.sleep(0.2)
        yield hosts
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
