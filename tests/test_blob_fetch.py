"""fetch_prebuilt / download_prefix against a real Azurite: both modes, --skip-download, resume
after the server is killed mid-download, integrity (server-side corruption), bad input."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from azure.storage.blob import BlobServiceClient, ContentSettings

from armlab.data.blob import RECORD_NAME, download_prefix, fetch_prebuilt
from armlab.errors import ArmlabError
from armlab.store import Retry
from armlab.store import download as blob_download
from azurite_util import KEY, Azurite, azurite_env


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    yield from azurite_env(tmp_path, monkeypatch)


# Give up quickly in tests; the defaults wait about a minute for a server that went away.
FAST = Retry(attempts=3, backoff=0.2, timeout=5)


def shard_bytes(rows: int, seed: int, chars: int = 100) -> bytes:
    """A real nanochat-style shard: one `text` column of incompressible-ish text."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2**63, size=(rows, chars // 16 + 1), dtype=np.int64)
    texts = [row.tobytes().hex()[:chars] for row in raw]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf, compression="none")
    return buf.getvalue()


def seed_blobs(server: Azurite, container: str, blobs: dict[str, bytes], *, blocks: bool = False) -> None:
    """Upload `blobs`; `blocks=True` uploads in 256 KiB blocks, which leaves no Content-MD5."""
    kw = {"max_single_put_size": 256 << 10, "max_block_size": 256 << 10} if blocks else {}
    cc = BlobServiceClient.from_connection_string(server.connection_string, **kw).get_container_client(
        container
    )
    if not cc.exists():
        cc.create_container()
    for name, data in blobs.items():
        cc.upload_blob(name, data, overwrite=True)


def local_files(dest: Path) -> dict[str, bytes]:
    return {
        p.relative_to(dest).as_posix(): p.read_bytes()
        for p in sorted(dest.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def hidden(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.rglob(".*") if p.name != RECORD_NAME)


def test_bulk_and_sequential_download_verified_and_skipped_on_rerun(azurite, tmp_path, monkeypatch):
    monkeypatch.setattr(blob_download, "SEGMENT_BYTES", 1 << 20)  # several resumable segments per big blob
    single = {f"top/shard_{i:05d}.parquet": shard_bytes(2000, i) for i in range(3)}
    blocked = {
        "top/shard_00003.parquet": shard_bytes(30000, 3),
        "top/sub/shard_00004.parquet": shard_bytes(4000, 4),
    }
    seed_blobs(azurite, "prebuilt", single)
    seed_blobs(azurite, "prebuilt", blocked, blocks=True)
    seed_blobs(
        azurite, "prebuilt", {"top/README.md": b"notes", "other/shard_00000.parquet": shard_bytes(10, 9)}
    )
    want = {k.removeprefix("top/"): v for k, v in {**single, **blocked}.items()}

    bulk = download_prefix("az://prebuilt/top", tmp_path / "bulk", mode="bulk", concurrency=4, retry=FAST)
    seq = download_prefix(
        "az://prebuilt/top/", tmp_path / "seq", mode="sequential", concurrency=4, retry=FAST
    )
    for report, d in ((bulk, tmp_path / "bulk"), (seq, tmp_path / "seq")):
        assert local_files(d) == want
        assert hidden(d) == []  # no .part files left
        assert report.fetched == 5 and report.skipped == 0 and report.ignored == ["README.md"]
        assert report.bytes_fetched == sum(len(v) for v in want.values())
        assert sorted(report.no_md5) == ["shard_00003.parquet", "sub/shard_00004.parquet"]
        rec = json.loads((d / RECORD_NAME).read_text())
        assert rec["files"]["shard_00000.parquet"]["verified"] == "size+etag+content-md5"
        assert rec["files"]["shard_00003.parquet"]["verified"].startswith(
            "size+etag (blob has no Content-MD5"
        )
        assert (
            rec["files"]["shard_00003.parquet"]["sha256"]
            == hashlib.sha256(want["shard_00003.parquet"]).hexdigest()
        )
        assert KEY not in (d / RECORD_NAME).read_text()

    again = download_prefix("az://prebuilt/top", tmp_path / "bulk", mode="bulk", concurrency=4, retry=FAST)
    assert again.fetched == 0 and again.skipped == 5 and again.bytes_fetched == 0

    # a blob replaced on the server is fetched again; one deleted there is removed locally
    seed_blobs(azurite, "prebuilt", {"top/shard_00000.parquet": shard_bytes(100, 42)})
    azurite.client().get_container_client("prebuilt").delete_blob("top/shard_00001.parquet")
    third = download_prefix("az://prebuilt/top", tmp_path / "bulk", mode="bulk", concurrency=4, retry=FAST)
    assert third.fetched == 1 and third.skipped == 3
    assert (tmp_path / "bulk" / "shard_00000.parquet").read_bytes() == shard_bytes(100, 42)
    assert not (tmp_path / "bulk" / "shard_00001.parquet").exists()

    # the contract entry point returns the dir
    assert (
        fetch_prebuilt("az://prebuilt/top", tmp_path / "bulk", mode="sequential", concurrency=2)
        == tmp_path / "bulk"
    )


def test_skip_download_works_offline_and_refuses_missing_or_changed_files(azurite, tmp_path):
    seed_blobs(azurite, "prebuilt", {f"p/shard_{i:05d}.parquet": shard_bytes(500, i) for i in range(3)})
    dest = tmp_path / "dl"
    with pytest.raises(ArmlabError, match="nothing was downloaded here yet"):
        download_prefix("az://prebuilt/p", dest, skip_download=True)
    download_prefix("az://prebuilt/p", dest, retry=FAST)
    azurite.stop()  # --skip-download must not need the server (graceful: the seeded blobs persist)

    report = download_prefix("az://prebuilt/p", dest, skip_download=True)
    assert report.skipped == 3 and report.fetched == 0
    with pytest.raises(ArmlabError, match="holds a download of az://prebuilt/p/, not az://prebuilt/q/"):
        download_prefix("az://prebuilt/q", dest, skip_download=True)

    (dest / "shard_00001.parquet").unlink()
    with pytest.raises(
        ArmlabError, match=r"1 of 3 blobs .* not on disk .*shard_00001\.parquet.*without --skip-download"
    ):
        download_prefix("az://prebuilt/p", dest, skip_download=True)

    # same size, one byte flipped: caught by the recorded md5, and the corrupt file is not kept
    p = dest / "shard_00002.parquet"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    azurite.start()
    download_prefix("az://prebuilt/p", dest, retry=FAST)  # refetches shard_00001 only
    p.write_bytes(bytes(data))
    with pytest.raises(ArmlabError, match=r"changed since download \(shard_00002\.parquet\); deleted"):
        download_prefix("az://prebuilt/p", dest, skip_download=True)
    assert not p.exists()


def test_blob_corrupted_on_server_is_detected_and_not_kept(azurite, tmp_path):
    good = shard_bytes(800, 1)
    seed_blobs(
        azurite, "prebuilt", {"p/shard_00000.parquet": good, "p/shard_00001.parquet": shard_bytes(800, 2)}
    )
    dest = tmp_path / "dl"
    download_prefix("az://prebuilt/p", dest, retry=FAST)

    # Overwrite the bytes on the server but keep the old Content-MD5 property (a silent corruption).
    bc = azurite.client().get_blob_client("prebuilt", "p/shard_00001.parquet")
    old_md5 = bc.get_blob_properties().content_settings.content_md5
    bad = bytearray(bc.download_blob().readall())
    bad[len(bad) // 2] ^= 0xFF
    bc.upload_blob(bytes(bad), overwrite=True)
    bc.set_http_headers(ContentSettings(content_md5=old_md5))

    with pytest.raises(
        ArmlabError,
        match=r"shard_00001\.parquet: content does not match the blob's Content-MD5 after 2 downloads",
    ):
        download_prefix("az://prebuilt/p", dest, retry=FAST)
    assert hidden(dest) == []  # no temp file left; the corrupt bytes never got the real name
    assert (dest / "shard_00001.parquet").read_bytes() != bytes(bad)

    fresh = tmp_path / "fresh"
    with pytest.raises(ArmlabError, match="after 2 downloads"):
        download_prefix("az://prebuilt/p", fresh, retry=FAST)
    assert sorted(local_files(fresh)) == ["shard_00000.parquet"] and hidden(fresh) == []


def test_bad_blobs_are_named_and_not_kept(azurite, tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": ["x", "y"]}), buf)
    ints = io.BytesIO()
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    seed_blobs(
        azurite,
        "prebuilt",
        {
            "p/good.parquet": shard_bytes(100, 0),
            "p/notparquet.parquet": b"this is a csv,really\n1,2\n",
            "p/notext.parquet": buf.getvalue(),
            "p/inttext.parquet": ints.getvalue(),
        },
    )
    dest = tmp_path / "dl"
    with pytest.raises(ArmlabError) as e:
        download_prefix("az://prebuilt/p", dest, retry=FAST)
    msg = str(e.value)
    assert "3 blobs not usable as shards" in msg
    assert "notparquet.parquet (not a parquet file" in msg or "inttext.parquet (column 'text' is int64" in msg
    assert "\n" not in msg
    assert sorted(local_files(dest)) == ["good.parquet"] and hidden(dest) == []


def test_bad_container_prefix_and_key_are_one_line_without_secrets(azurite, tmp_path, monkeypatch):
    seed_blobs(azurite, "prebuilt", {"p/a.parquet": shard_bytes(10, 0), "q/readme.txt": b"x"})
    with pytest.raises(
        ArmlabError, match=r"az://nosuch/p/: container not found at http://127\.0\.0\.1:\d+/devstoreaccount1"
    ):
        download_prefix("az://nosuch/p", tmp_path / "a", retry=FAST)
    with pytest.raises(ArmlabError, match=r"az://prebuilt/empty/: no \.parquet blobs under this prefix"):
        download_prefix("az://prebuilt/empty", tmp_path / "b", retry=FAST)
    with pytest.raises(ArmlabError, match=r"it holds only: readme\.txt"):
        download_prefix("az://prebuilt/q", tmp_path / "b", retry=FAST)

    wrong = "V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3JvbmdLZXlXcm9uZ0tleVdyb25nS2V5V3Jvbmc0Mg=="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string.replace(KEY, wrong))
    with pytest.raises(ArmlabError) as e:
        download_prefix("az://prebuilt/p", tmp_path / "c", retry=FAST)
    msg = str(e.value)
    assert "access denied" in msg and "AZURE_STORAGE_CONNECTION_STRING" in msg
    assert wrong not in msg and KEY not in msg and "\n" not in msg
    assert not (tmp_path / "c").exists() or local_files(tmp_path / "c") == {}


def _kill_when_partial(server: Azurite, part: Path, min_bytes: int, killed: threading.Event) -> None:
    """Kill Azurite as soon as `part` holds `min_bytes` (a download really in flight)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        if part.exists() and part.stat().st_size >= min_bytes:
            server.kill()
            killed.set()
            return
        time.sleep(0.001)


def _big_prefix(server: Azurite) -> dict[str, bytes]:
    blobs = {f"big/shard_{i:05d}.parquet": shard_bytes(60000, 100 + i) for i in range(3)}  # ~6 MB each
    seed_blobs(server, "prebuilt", blobs, blocks=True)
    server.restart()  # graceful: Azurite persists the seeded metadata before we kill it hard
    return {k.removeprefix("big/"): v for k, v in blobs.items()}


def _kill_mid_download(
    server: Azurite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, bytes], Path, threading.Event]:
    """Seed three ~6 MB blobs and arm a watcher that SIGKILLs Azurite once the second blob's part
    file holds 1 MiB; returns the blobs, the download dir and the event set at the kill."""
    monkeypatch.setattr(blob_download, "SEGMENT_BYTES", 256 << 10)
    want = _big_prefix(server)
    dest = tmp_path / "dl"
    killed = threading.Event()
    part = dest / ".shard_00001.parquet.part"
    threading.Thread(target=_kill_when_partial, args=(server, part, 1 << 20, killed), daemon=True).start()
    return want, dest, killed


@pytest.mark.e2e
def test_resume_after_azurite_killed_mid_download_and_restarted(azurite, tmp_path, monkeypatch):
    want, dest, killed = _kill_mid_download(azurite, tmp_path, monkeypatch)

    def restart_later() -> None:
        killed.wait(30)
        time.sleep(1.0)  # the downloader sees the server gone and backs off meanwhile
        azurite.start()

    threading.Thread(target=restart_later, daemon=True).start()
    slow = Retry(attempts=6, backoff=0.5, timeout=5)
    report = download_prefix("az://prebuilt/big", dest, mode="sequential", retry=slow)
    assert killed.is_set()
    assert local_files(dest) == want and hidden(dest) == []
    assert report.fetched == 3
    assert report.bytes_resumed >= 1 << 20  # continued with ranged reads, not from zero


@pytest.mark.e2e
def test_server_gone_is_a_clear_error_and_rerun_resumes_the_partial(azurite, tmp_path, monkeypatch):
    want, dest, killed = _kill_mid_download(azurite, tmp_path, monkeypatch)
    with pytest.raises(ArmlabError) as e:
        download_prefix("az://prebuilt/big", dest, mode="sequential", retry=FAST)
    msg = str(e.value)
    assert killed.is_set()
    assert (
        "cannot reach http://127.0.0.1" in msg
        and "after 3 attempts" in msg
        and "rerun the same command" in msg
    )
    assert "\n" not in msg and KEY not in msg
    # the finished blob is kept, the interrupted one only under its temp name with its progress recorded
    assert sorted(local_files(dest)) == ["shard_00000.parquet"]
    rec = json.loads((dest / RECORD_NAME).read_text())
    done = rec["partial"]["shard_00001.parquet"]["done"]
    assert done >= 1 << 20 and (dest / ".shard_00001.parquet.part").stat().st_size >= done

    azurite.start()
    report = download_prefix("az://prebuilt/big", dest, mode="bulk", concurrency=2, retry=FAST)
    assert local_files(dest) == want and hidden(dest) == []
    assert report.skipped == 1 and report.fetched == 2
    assert report.bytes_resumed == done
    assert report.bytes_fetched == len(want["shard_00001.parquet"]) - done + len(want["shard_00002.parquet"])


@pytest.mark.e2e
def test_armlab_process_killed_mid_download_then_rerun_resumes(azurite, tmp_path, monkeypatch):
    import os
    import signal
    import subprocess
    import sys

    monkeypatch.setattr(blob_download, "SEGMENT_BYTES", 256 << 10)
    want = _big_prefix(azurite)
    dest = tmp_path / "dl"
    code = (
        "import armlab.store.download as b; b.SEGMENT_BYTES = 256 << 10; "
        f"b.download_prefix('az://prebuilt/big', {str(dest)!r}, mode='sequential')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **azurite.env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    part = dest / ".shard_00001.parquet.part"
    deadline = time.time() + 60
    while time.time() < deadline and not (part.exists() and part.stat().st_size >= 1 << 20):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(local_files(dest)) == ["shard_00000.parquet"]  # the interrupted blob has no real name yet
    done = json.loads((dest / RECORD_NAME).read_text())["partial"]["shard_00001.parquet"]["done"]
    assert done > 0
    # the kill may also land inside a record write: its temp file must not outlive the rerun
    (dest / f".{RECORD_NAME}.cutshort.tmp").write_text('{"partial": ')

    report = download_prefix("az://prebuilt/big", dest, mode="sequential", retry=FAST)
    assert local_files(dest) == want and hidden(dest) == []
    assert report.skipped == 1 and report.bytes_resumed == done
