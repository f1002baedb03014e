"""Progress off a terminal: plain lines with the figures (count, rate, MB/s, ETA), no colour or
cursor codes, and no message folded at 80 columns; the same through a real piped `armlab prepare`."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from armlab.progress import PlainProgress
from data_util import experiment_toml, make_pool


def test_plain_progress_lines() -> None:
    out = io.StringIO()
    console = Console(file=out, width=80, soft_wrap=True, color_system=None)
    with PlainProgress(console, every=0) as p:
        t = p.add_task("download " + "x" * 80, total=4, unit="files", bytes=0)
        for i in range(4):
            p.update(t, advance=1, bytes=(i + 1) * 2_000_000)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4, lines  # every update (every=0), the last one marks the end
    assert all(line.startswith("download " + "x" * 80 + ": ") for line in lines)  # not folded at 80
    assert "1/4 files (25%)" in lines[0] and "files/s" in lines[0] and "MB/s" in lines[0] and "eta " in lines[0]
    assert "4/4 files (100%)" in lines[-1] and "eta" not in lines[-1] and "elapsed" in lines[-1]

    out = io.StringIO()
    quiet = PlainProgress(Console(file=out), transient=True, every=3600)
    t = quiet.add_task("CORE", total=3, unit="items")
    for _ in range(3):
        quiet.advance(t)
    assert out.getvalue() == ""  # a short transient step leaves nothing in the log


def test_piped_prepare_logs_plain_lines(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "workdir"  # messages longer than 80 columns
    make_pool(tmp_path / "pool", n_docs=400, n_files=2)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(deep, str(tmp_path / "pool")))
    r = subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", "prepare", str(exp), "--workers", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "ARMLAB_PROGRESS_EVERY": "0"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "\x1b" not in err and "\r" not in err, repr(err[:500])  # no colour, no redraws
    assert not any(ch in err for ch in "━╸█"), err  # no bars
    lines = err.splitlines()
    assert any(line.startswith("key pass: ") and "files/s" in line for line in lines), err
    # every message that names the workdir holds the whole path on one line
    for line in (line for line in lines if "a-rather-long" in line):
        assert str(deep) in line or str(deep.parent) in line, line
    assert sum(str(deep) in line for line in lines) >= 1 and max(map(len, lines)) > 80
