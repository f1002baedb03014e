"""CORE bundles from a URL, served by a real HTTP server on loopback through the same download code
path as DCLM's bundle: downloaded once under a lock, sha256 recorded and checked on every later use."""

from __future__ import annotations

import hashlib
import http.server
import re
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.evaluate.bundle import RECORD, load_bundle, write_bundle
from armlab.pipeline import open_bundle
from armlab.spec import DCLM_EVAL_BUNDLE_URL, EvaluateSpec
from nanochat_util import snapshot
from results_util import tiny_experiment


def tasks() -> list[dict]:
    return [
        {
            "label": "mc",
            "icl_task_type": "multiple_choice",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 50.0,
            "items": [{"query": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(8)],
        }
    ]


class Server:
    """A directory served over HTTP on 127.0.0.1, counting GETs per path (optionally slow)."""

    def __init__(self, root: Path, delay: float = 0.0):
        self.gets: Counter[str] = Counter()
        served = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                served.gets[self.path] += 1
                time.sleep(delay)
                super().do_GET()

            def log_message(self, *args):  # keep pytest output clean
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def zipped(tmp_path: Path) -> Path:
    """eval_bundle.zip like nanochat's: one top-level eval_bundle/ dir."""
    root = write_bundle(tmp_path / "src" / "eval_bundle", tasks())
    www = tmp_path / "www"
    www.mkdir()
    with zipfile.ZipFile(www / "eval_bundle.zip", "w") as z:
        for p in sorted(root.rglob("*")):
            z.write(p, p.relative_to(root.parent))
    return www


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Server, str]]:
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "2")  # the storage seam's retries, kept short
    monkeypatch.setenv("ARMLAB_NET_BACKOFF", "0.05")
    server = Server(zipped(tmp_path))
    yield server, server.url("eval_bundle.zip")
    server.close()


def test_downloaded_once_recorded_and_reused(served: tuple[Server, str], tmp_path: Path) -> None:
    server, url = served
    zip_sha = hashlib.sha256((tmp_path / "www/eval_bundle.zip").read_bytes()).hexdigest()
    b = load_bundle(url)
    assert [t.label for t in b.tasks] == ["mc"] and len(b.load_items(b.tasks[0])) == 8
    assert b.describe()["archive_sha256"] == zip_sha and b.source == url
    again = load_bundle(url, sha256=zip_sha)  # the recorded sha256 is checked against the experiment's
    assert again.sha256 == b.sha256 and server.gets["/eval_bundle.zip"] == 1
    assert (next((tmp_path / "cache/bundles").glob(f"*/{RECORD}"))).is_file()


def test_a_wrong_sha256_is_refused_and_nothing_kept(served: tuple[Server, str], tmp_path: Path) -> None:
    server, url = served
    with pytest.raises(ArmlabError, match=r"eval bundle sha256 is [0-9a-f]{64}, expected 0{64}"):
        load_bundle(url, sha256="0" * 64)
    assert not list((tmp_path / "cache/bundles").rglob("*.zip"))
    load_bundle(url)  # downloads again, now without a checksum
    with pytest.raises(
        ArmlabError, match=r"cached eval bundle has sha256 [0-9a-f]{64}, the experiment expects 1{64}"
    ):
        load_bundle(url, sha256="1" * 64)
    assert server.gets["/eval_bundle.zip"] == 2


def test_an_edited_cache_is_noticed(served: tuple[Server, str], tmp_path: Path) -> None:
    _, url = served
    b = load_bundle(url)
    (b.root / "eval_data" / "mc.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 1}\n')
    with pytest.raises(
        ArmlabError, match=r"cached eval bundle was modified since it was downloaded from"
    ) as e:
        load_bundle(url)
    assert "to download it again" in str(e.value)


def test_concurrent_processes_download_once(served: tuple[Server, str], tmp_path: Path) -> None:
    server, _ = served
    server.close()
    slow = Server(tmp_path / "www", delay=1.0)  # the first download is still running when the second asks
    url = slow.url("eval_bundle.zip")
    code = f"from armlab.evaluate.bundle import load_bundle; print(load_bundle({url!r}).sha256)"
    env = {"ARMLAB_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
            )
            for _ in range(3)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        slow.close()
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert len({o[0] for o in outs}) == 1 and slow.gets["/eval_bundle.zip"] == 1


def test_errors_name_the_url(served: tuple[Server, str]) -> None:
    server, _ = served
    with pytest.raises(
        ArmlabError, match=r"127\.0\.0\.1:\d+/missing\.zip: cannot download the eval bundle \(not found"
    ):
        load_bundle(server.url("missing.zip"))


def test_the_experiment_default_is_dclms_bundle_where_nanochat_gets_it(
    served: tuple[Server, str], tmp_path: Path
) -> None:
    base_eval = snapshot("92d63d4") / "scripts" / "base_eval.py"  # skips, saying why, without the snapshots
    theirs = re.search(r'^EVAL_BUNDLE_URL = "([^"]+)"', base_eval.read_text(), re.M).group(1)
    assert EvaluateSpec().core_bundle == DCLM_EVAL_BUNDLE_URL == theirs
    assert EvaluateSpec(core_bundle="none").bundle is None and EvaluateSpec(core_bundle="").bundle is None
    # evaluation opens the experiment's bundle through the same download path
    _, url = served
    exp = tiny_experiment(tmp_path / "wd").model_copy(update={"evaluate": EvaluateSpec(core_bundle=url)})
    assert open_bundle(exp).describe()["source"] == url
    off = exp.model_copy(update={"evaluate": EvaluateSpec(core_bundle="none")})
    assert open_bundle(off) is None


def test_offline_the_download_error_offers_core_bundle_none(served: tuple[Server, str]) -> None:
    """The server gone (offline): one line naming the URL, the cause, and the way to train
    without CORE (`core_bundle = "none"` / `--bundle none`), or with a local copy."""
    server, url = served
    server.close()
    with pytest.raises(ArmlabError) as e:
        load_bundle(url)
    msg = str(e.value)
    assert msg.startswith(f"{url}: cannot download the eval bundle (cannot reach 127.0.0.1 after 2 attempts"), msg
    assert 'core_bundle = "none" under [evaluate]' in msg and "--bundle none" in msg and "\n" not in msg


def test_downloaded_through_the_storage_seam_retried_reused_and_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bundle download is the storage seam's: a server that fails once is retried (a line says
    so), a token in the URL goes on the requests only (never into the cache or a message), and a
    zip still on disk is reused while the server lists the same version (a HEAD, no bytes)."""
    from armlab.evaluate.bundle import cached
    from http_util import PoolServer

    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "2")
    monkeypatch.setenv("ARMLAB_NET_BACKOFF", "0.05")
    token = "t0k3n-S3CR3T-bundle"
    with PoolServer(zipped(tmp_path), token=token, fails=1) as server:
        url = f"{server.url}/eval_bundle.zip?token={token}"
        b = load_bundle(url)
        assert [t.label for t in b.tasks] == ["mc"] and b.source == f"{server.url}/eval_bundle.zip?token=***"
        assert [h.status for h in server.log.hits if h.method == "GET"] == [503, 200]
        assert "(attempt 1/2); retrying" in capsys.readouterr().err
        unpacked = cached(url)
        assert unpacked is not None
        for p in sorted(unpacked.rglob("*"), reverse=True):  # the unpacked bundle gone, its zip kept
            p.unlink() if p.is_file() else p.rmdir()
        unpacked.rmdir()
        server.log.clear()
        assert load_bundle(url).sha256 == b.sha256
        assert server.log.file_bytes("eval_bundle.zip") == 0 and [h.method for h in server.log.hits] == ["HEAD"]
    with pytest.raises(ArmlabError) as e:  # the server gone: the one line names the URL, not its token
        load_bundle(f"{server.url}/other.zip?token={token}")
    assert "cannot download the eval bundle" in str(e.value) and token not in str(e.value) + capsys.readouterr().err
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert written and not [p for p in written if token.encode() in p.read_bytes()]


def test_a_bundle_server_that_never_answers_is_said_within_the_net_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ARMLAB_NET_TIMEOUT bounds every request of the download (0.2: a fixed 60 s urlopen), and
    of doctor's and init's probe of the URL."""
    from armlab.evaluate.bundle import probe
    from http_util import SilentServer

    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "1")
    monkeypatch.setenv("ARMLAB_NET_TIMEOUT", "1")
    with SilentServer() as server:
        assert probe(f"{server.url}/eval_bundle.zip") == "unreachable (no answer from 127.0.0.1 in 1 s (after 1 attempt))"
        with pytest.raises(ArmlabError) as e:
            load_bundle(f"{server.url}/eval_bundle.zip")
    msg = str(e.value)
    assert "cannot download the eval bundle (no answer from 127.0.0.1 in 1 s" in msg, msg
    assert 'core_bundle = "none"' in msg and "--bundle none" in msg and "\n" not in msg
