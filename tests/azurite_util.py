"""A real Azurite blob server for tests (and bench/blob.py): start, kill, restart on the same port.

Azurite is installed by scripts/test.sh (`npm install --prefix .cache/npm azurite@3`). Without it
the fixture FAILS (it does not skip): a skipped Azure test must never count as passing.

    @pytest.fixture
    def azurite(tmp_path, monkeypatch):  # function scope: a fresh server and data dir per test
        yield from azurite_env(tmp_path, monkeypatch)

    def test_x(azurite):
        azurite.env()               # AZURE_STORAGE_CONNECTION_STRING for the devstoreaccount1 account
        azurite.client()            # a BlobServiceClient on it
        azurite.restart()           # graceful: persists blobs seeded so far (see `stop`)
        azurite.kill(); azurite.start()   # server goes away mid-test, comes back with the same data
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
AZURITE_BIN = REPO / ".cache" / "npm" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's well-known development account (public, documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    """One azurite-blob process on 127.0.0.1:`port`, storing its data under `location`."""

    def __init__(self, location: Path, port: int | None = None):
        self.location = Path(location)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={self.url};"
        )

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string}

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    def start(self, timeout: float = 30.0) -> Azurite:
        if not AZURITE_BIN.exists():
            pytest.fail(
                f"Azurite is not installed ({AZURITE_BIN} missing): run scripts/test.sh (installs Azurite)"
            )
        self.location.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                str(AZURITE_BIN),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(self.location),
                "--skipApiVersionCheck",
                "--silent",
                "--loose",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: kill() takes node and children
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                pytest.fail(
                    f"azurite-blob exited with {self.proc.returncode} on port {self.port}: {err[-500:]}"
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return self
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"azurite-blob did not answer on port {self.port} within {timeout:.0f}s")

    def stop(self) -> None:
        """Graceful shutdown: Azurite saves its metadata (which it otherwise autosaves only every
        few seconds), so blobs written just before survive a later `kill()` + `start()`."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def restart(self) -> Azurite:
        """Graceful stop, then start on the same port and location (seeded data persists)."""
        self.stop()
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server (the 'server went away' fault); its data stays in `location`."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@contextlib.contextmanager
def running_azurite(location: Path | None = None) -> Iterator[Azurite]:
    with contextlib.ExitStack() as stack:
        if location is None:
            location = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="azurite-")))
        server = Azurite(location).start()
        try:
            yield server
        finally:
            server.kill()


def azurite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Azurite]:
    """Body of an `azurite` fixture: a fresh Azurite, with the environment pointing armlab at it
    (and at nothing else). In a test module:

        @pytest.fixture
        def azurite(tmp_path, monkeypatch):
            yield from azurite_env(tmp_path, monkeypatch)
    """
    from armlab.store.azure_auth import ENV_VARS

    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    with running_azurite(tmp_path / "azurite") as server:
        for k, v in server.env().items():
            monkeypatch.setenv(k, v)
        yield server


# Shared by the publish/pull tests: quick retries (the server is local) and a one-arm experiment.
def fast_retries() -> Any:
    from armlab.store import Retry

    return Retry(attempts=2, backoff=0.2, timeout=5)


RANDOM_ARM = """
[[arms]]
name = "rand"
kind = "random"
ratio = 0.5
seed = 42
"""


def armlab(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess, with Azurite's credentials in its environment."""
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
