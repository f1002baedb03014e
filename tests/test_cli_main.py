"""The conventions every command shares, through the real `armlab` entry point (`cli.main`):
`--version`, help text (EXP in usage, no `<bool>`), list flags, the path the user typed in
messages, Ctrl-C, and a workdir path that is a file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.core import TyperOption

from armlab import __version__
from armlab.cli import app
from armlab.cli.app import split_ints, split_list
from data_util import make_pool


def armlab(*args: str, cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env},
    )  # fmt: skip


def one_line(r: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == rc, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


EXP = """\
name = "cli-main"
workdir = "{workdir}"

[pool]
uri = "{root}/pool"

[[arms]]
name = "a"
kind = "random"
ratio = 0.5

[model]
depth = 2
max_seq_len = 64

[train]
num_iterations = 10

[evaluate]
core_bundle = "none"  # doctor checks the bundle; the default (DCLM's, online) would leave loopback
"""


def write_exp(root: Path, workdir: Path, name: str = "exp.toml") -> Path:
    p = root / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(EXP.format(root=root, workdir=workdir))
    return p


def test_version(tmp_path: Path) -> None:
    r = armlab("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"armlab {__version__}", r


def commands() -> list[str]:
    return sorted(typer.main.get_command(app).commands)


def test_help_says_exp_and_shows_no_bool_or_braces(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    runner = CliRunner()
    top = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert top.exit_code == 0 and "<bool>" not in top.output and "--version" in top.output
    for cmd in commands():
        out = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in out and "{" not in out.split("\n\n")[0], (cmd, out)
        usage = next(line for line in out.splitlines() if "Usage:" in line)
        args = usage.split()[3:]  # after "Usage: armlab <command>"
        assert not any("exp" in word for word in args), (cmd, usage)  # the argument is EXP, as the README writes it
    train = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    assert "Usage: armlab train [OPTIONS] EXP" in train
    assert "Usage: armlab init [OPTIONS] [EXP]" in runner.invoke(app, ["init", "--help"]).output


def test_every_list_flag_is_repeatable_and_takes_commas() -> None:
    """One convention: a flag that takes several values is repeatable, and (unless its values are
    paths, where a comma is a legal character) also takes a,b."""
    cli = typer.main.get_command(app)
    seen = 0
    for name, cmd in cli.commands.items():
        for p in cmd.params:
            if not isinstance(p, TyperOption) or p.is_flag:
                continue
            assert "comma-separated" not in (p.help or ""), (name, p.opts)  # the old --arms a,b only
            if p.multiple and "Path" not in p.display_type(None):
                seen += 1
                assert p.callback is not None and "split" in p.callback.__name__, (name, p.opts)
    assert seen >= 10  # run --arm/--seed, prepare --arm, evaluate --arm, compare --exclude, setup, doctor, ...
    assert split_list(["a,b", " c ", ""]) == ["a", "b", "c"] and split_list(None) is None
    assert split_ints(["0,1", "2"]) == [0, 1, 2]


def test_list_flags_in_use(tmp_path: Path) -> None:
    exp = write_exp(tmp_path, tmp_path / "wd")
    # the comma form reaches the command as two arms: the second is unknown
    one_line(armlab("prepare", str(exp), "--arm", "a,nosuch", cwd=tmp_path), "no arm named 'nosuch'")
    one_line(armlab("run", str(exp), "--seed", "0,x", cwd=tmp_path), "--seed", "expected integers")
    # the old plural spellings still work
    one_line(armlab("run", str(exp), "--arms", "a", "--seeds", "zero", cwd=tmp_path), "--seed")


def test_messages_name_the_experiment_path_as_typed(tmp_path: Path) -> None:
    write_exp(tmp_path, tmp_path / "wd", name="my dir/my exp.toml")
    (tmp_path / "wd").mkdir()
    line = one_line(armlab("evaluate", "my dir/my exp.toml", cwd=tmp_path), "has no finished runs")
    assert "`armlab status 'my dir/my exp.toml'`" in line and "EXP" not in line


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path: Path) -> None:
    exp = write_exp(tmp_path, tmp_path / "wd")
    (tmp_path / "wd").mkdir()
    p = subprocess.Popen(
        [sys.executable, "-c", "from armlab.cli import main; main()", "status", str(exp), "--watch", "--interval", "0.5"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a suite started in the background (`pytest &`) inherits SIGINT ignored, and Python then
        # keeps ignoring it: give the child the default disposition a terminal's Ctrl-C meets
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        assert p.stdout is not None
        assert "a-s0" in p.stdout.readline() + p.stdout.readline() + p.stdout.readline()  # it is watching
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, (p.returncode, err)
    assert err.strip().splitlines() == ["armlab: interrupted; rerun the same command to resume"], err


@pytest.mark.e2e  # ten real CLI processes (~15 s)
@pytest.mark.parametrize(
    "args",
    [
        ["train", "{exp}", "--arm", "a"],
        ["doctor", "{exp}", "--local", "--json"],
        ["status", "{exp}"],
        ["prepare", "{exp}"],
        ["tokenizer", "{exp}"],
        ["evaluate", "{exp}"],
        ["compare", "{exp}"],
        ["stop", "{exp}"],
        ["logs", "{exp}", "--arm", "a"],
        ["rm", "{exp}", "--arm", "a", "--run", "a-s0"],
    ],
    ids=lambda a: a[0],
)
def test_workdir_that_is_a_file(tmp_path: Path, args: list[str]) -> None:
    workdir = tmp_path / "wd"
    workdir.write_text("not a dir")
    make_pool(tmp_path / "pool", n_docs=40, n_files=1)  # a valid pool: prepare checks it before the workdir
    exp = write_exp(tmp_path, workdir)
    r = armlab(*[a.replace("{exp}", str(exp)) for a in args], cwd=tmp_path)
    if args[0] == "doctor":  # doctor reports it as a failed check, and skips the checks that read it
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
        assert checks["workdir"]["status"] == "fail" and "is a file, not a directory" in checks["workdir"]["detail"]
        assert [c for c in checks.values() if c["status"] == "fail"] == [checks["workdir"]]
    else:
        one_line(r, str(workdir), "is a file, not a directory")
    assert workdir.read_text() == "not a dir"
