"""`armlab check DIR` output: each problem once (the first as the error line, the rest listed),
and counts with the right plural."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def check(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", "check", str(d), "--no-hashes"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_each_problem_once_and_plurals(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a doc"]}), tmp_path / "shard_00000.parquet")  # 1 file, 1 row, 1 group
    manifest = {"complete": False, "files": [{"name": "shard_00000.parquet", "rows": 1},
                                             {"name": "shard_00001.parquet", "rows": 5}]}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    r = check(tmp_path)
    assert r.returncode == 2, r
    assert r.stdout.splitlines()[0] == f"{tmp_path}: 1 file, 1 row, 1 row group"
    both = r.stdout + r.stderr
    problems = ["manifest.json: not complete", "shard_00001.parquet: listed in manifest.json but missing"]
    for p in problems:
        assert both.count(p) == 1, (p, both)  # 0.1 printed the first problem twice
    (err,) = r.stderr.strip().splitlines()
    assert "(and 1 more problem above)" in err and "fix: " in err
