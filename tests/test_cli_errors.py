"""Bad input across commands, through the real `armlab` entry point: one line on stderr naming the
flag or file and what to do, exit 2, no traceback, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def armlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_one_line(r: subprocess.CompletedProcess, *needles: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("armlab: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.mark.parametrize(
    "args, needles",
    [
        (["prepare", "x.toml", "--workers", "0"], ["--workers", "armlab prepare --help"]),
        (["plan", "x.toml", "--arm", "a"], ["No such option: --arm"]),
        (["train"], ["Missing argument 'EXP'"]),
        (["nosuch"], ["No such command 'nosuch'"]),
        (["train", "x.toml", "--arm", "a", "--device", "tpu"], ["--device", "'tpu': use cpu or cuda"]),
        (["run", "x.toml", "--device", "tpu"], ["--device", "use cpu or cuda"]),
        (["evaluate", "x.toml", "--device", "tpu"], ["--device", "use cpu or cuda"]),
        (["doctor", "--device", "tpu"], ["--device", "use cpu or cuda"]),
        (["train", "x.toml", "--arm", "a", "--nproc", "0"], ["--nproc"]),
        (["train", "x.toml", "--arm", "a", "--num-gpus", "0"], ["--num-gpus"]),
        (["train", "x.toml", "--arm", "a", "--master-port", "70000"], ["--master-port"]),
        (["doctor", "--master-port", "-1"], ["--master-port"]),
        (["doctor", "--nproc", "0"], ["--nproc"]),
        (["run", "x.toml", "--num-gpus", "-2"], ["--num-gpus"]),
        (["check", ".", "--world-size", "0"], ["--world-size"]),
    ],
)
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], needles: list[str]) -> None:
    # x.toml does not exist: every one of these is refused while parsing, before the file is read
    assert_one_line(armlab(*args, cwd=tmp_path), *needles)
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_bad_device_before_any_work(tmp_path: Path) -> None:
    r = armlab("demo", "--workdir", str(tmp_path / "d"), "--device", "tpu", cwd=tmp_path)
    assert_one_line(r, "--device")
    assert not (tmp_path / "d").exists()  # it used to build the pool, prepare and train the tokenizer first


def test_experiment_path_mistakes(tmp_path: Path) -> None:
    assert_one_line(armlab("plan", "missing.toml", cwd=tmp_path), "missing.toml: experiment file not found")
    assert_one_line(armlab("status", str(tmp_path), cwd=tmp_path), "a directory without experiment.toml")
    (tmp_path / "bad.toml").write_text('name = "x"\n[pool\n')
    assert_one_line(armlab("prepare", "bad.toml", cwd=tmp_path), "bad.toml: invalid TOML", "line 2")


def test_help_shows_hosts_sections_literally(tmp_path: Path) -> None:
    # rich markup used to swallow "[[hosts]]" into "[]"
    r = armlab("doctor", "--help", cwd=tmp_path)
    assert r.returncode == 0 and "[[hosts]]" in r.stdout
