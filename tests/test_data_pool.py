"""Pool listing: each file's content identity (what the pool fingerprint covers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.data.pool import list_pool
from armlab.spec import PoolSpec
from armlab.store.fsspec import version_of as remote_identity
from data_util import experiment_toml, make_pool
from test_data_prepare import assert_refused


def identities(uri: str | Path) -> dict[str, str]:
    return {Path(f.path).name: f.identity for f in list_pool(PoolSpec(uri=str(uri)))}


def rescore(path: Path, seed: int) -> None:
    """Rewrite `path` in place with new scores, keeping its name, size and mtime."""
    st = path.stat()
    t = pq.read_table(path)
    scores = np.random.default_rng(seed).normal(size=t.num_rows)
    pq.write_table(t.set_column(t.schema.get_field_index("score"), "score", pa.array(scores)), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_local_parquet_identity_follows_the_footer_not_the_mtime(tmp_path: Path) -> None:
    make_pool(tmp_path / "a", 400, n_files=2)
    before = identities(tmp_path / "a")
    assert all(v.startswith("pq:") for v in before.values()) and len(set(before.values())) == 2
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # new mtimes, same bytes
    assert identities(tmp_path / "b") == before

    f = tmp_path / "a" / "part-000.parquet"
    rescore(f, seed=7)
    after = identities(tmp_path / "a")
    assert after["part-000.parquet"] != before["part-000.parquet"]
    assert after["part-001.parquet"] == before["part-001.parquet"]


def test_a_same_size_rewrite_of_a_jsonl_file_changes_its_identity(tmp_path: Path) -> None:
    (f,) = make_pool(tmp_path, 200, n_files=1, fmt="jsonl")
    before = identities(tmp_path)["part-000.jsonl"]
    assert before.startswith("stat:")
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-20] = ord("x") if data[-20] != ord("x") else ord("y")  # one byte, same size and mtime
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert identities(tmp_path)["part-000.jsonl"] != before


def test_a_truncated_parquet_file_still_lists(tmp_path: Path) -> None:
    """Listing never fails on a bad file (the key pass names it, and --skip-bad-files applies)."""
    (f,) = make_pool(tmp_path, 200, n_files=1)
    f.write_bytes(f.read_bytes()[:500])
    assert identities(tmp_path)["part-000.parquet"].startswith("stat:500:")


def test_remote_identity_takes_what_the_store_lists(tmp_path: Path) -> None:
    make_pool(tmp_path, 200, n_files=1)
    (got,) = identities(f"file://{tmp_path}").values()  # fsspec's local filesystem lists mtime
    assert got.startswith("mtime:")
    hub = {"name": "x", "size": 5, "blob_id": "b1", "lfs": {"size": 5, "sha256": "abc", "pointer_size": 1}}
    assert remote_identity(hub) == "sha256:abc"
    assert remote_identity({**hub, "lfs": None}) == "git:b1"
    assert remote_identity({"size": 5, "ETag": '"5f-1a"', "Last-Modified": "Tue"}) == "etag:5f-1a"
    assert remote_identity({"size": 5, "Last-Modified": "Tue, 01 Jul 2025"}) == "mtime:Tue, 01 Jul 2025"
    assert remote_identity({"size": 5}) == ""


def test_a_dir_listing_skips_manifests_and_hidden_files(tmp_path: Path) -> None:
    """An armlab data dir used as a pool holds shards + manifest.json (a JSON object, not jsonl);
    Spark/Dask dirs hold _SUCCESS / _metadata; leases and temp files start with a dot."""
    make_pool(tmp_path / "pool" / "sub", 200, n_files=2)
    for name in ("manifest.json", "sub/manifest.json", ".lease", "_SUCCESS", ".part-9.parquet.123.tmp"):
        (tmp_path / "pool" / name).write_text("{}")
    (tmp_path / "pool" / "_metadata").mkdir()
    (tmp_path / "pool" / "_metadata" / "x.parquet").write_bytes(b"not a pool file")
    (tmp_path / "pool" / "notes.jsonl").write_text('{"text": "kept: an explicit jsonl file"}\n')
    assert sorted(identities(tmp_path / "pool")) == ["notes.jsonl", "part-000.parquet", "part-001.parquet"]
    assert sorted(identities(f"{tmp_path}/pool/**/*.json*")) == ["notes.jsonl"]


@pytest.mark.parametrize(("module", "step"), [("keys", "key_pass"), ("routing", "text_pass")])
def test_a_pool_file_deleted_mid_prepare_is_one_line(tmp_path: Path, module: str, step: str) -> None:
    """A listed file deleted before the key pass or the text pass reads it: one line naming it and
    what to do, exit 2 (0.2: a traceback and exit 1 in the text pass, 'unreadable' in the key pass).
    The deletion is made at that moment by wrapping the step, in the real CLI with one worker."""
    make_pool(tmp_path / "pool", 600, n_files=3)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(tmp_path / "pool")))
    gone = tmp_path / "pool" / "part-002.parquet"
    code = f"""
import os, sys
import armlab.data.prepare.{module} as m
real = m.{step}
def {step}(*a, **kw):
    if os.path.exists({str(gone)!r}):
        os.remove({str(gone)!r})
    return real(*a, **kw)
m.{step} = {step}
from armlab.cli import main
sys.argv = ["armlab", "prepare", {str(exp)!r}, "--workers", "1"]
main()
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert not gone.exists()
    assert_refused(res, str(gone), "deleted while prepare ran", "rerun prepare")
    assert not (tmp_path / "wd" / "arms" / "rand" / "data").exists()
