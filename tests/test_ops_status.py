"""`armlab status` rendering: the narrow layout fits 80 columns, the full table when wide, plain
lines when piped, `--json`, no ETA for a dead run, and a workdir that does not exist."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from armlab.ops.status import COLUMNS, RunStatus, experiment_status, status_table
from armlab.spec import Experiment, parse_experiment
from results_util import make_run

ARMS = ["edu-top16.5", "random16.5"]  # the playbook's names: long enough to overflow 80 columns


def playbook_experiment(workdir: Path) -> Experiment:
    return parse_experiment(
        {
            "name": "fineweb-edu-top-vs-random",
            "workdir": str(workdir),
            "pool": {"uri": str(workdir / "pool")},
            "arms": [
                {"name": ARMS[0], "kind": "top", "ratio": 0.165, "score_column": "score"},
                {"name": ARMS[1], "kind": "random", "ratio": 0.165, "seed": 42},
            ],
            "model": {"depth": 2, "max_seq_len": 64},
            "train": {"num_iterations": 20000, "seeds": [0, 1]},
        }
    )


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def set_state(run_dir: Path, **fields) -> None:
    st = json.loads((run_dir / "state.json").read_text())
    st.update(fields)
    (run_dir / "state.json").write_text(json.dumps(st))


@pytest.fixture
def runs(tmp_path: Path) -> tuple[Experiment, dict[str, RunStatus]]:
    """One run in each state a user meets: done, running (this process: alive), dead (a pid that
    exited), STALLED (another host, silent for an hour) and queued (no run dir)."""
    exp = playbook_experiment(tmp_path / "wd")
    big = dict(steps=10, tokens_per_step=524_288)
    make_run(exp, ARMS[0], 0, bpb=0.8123, **big)
    running = make_run(exp, ARMS[0], 1, bpb=0.9, state="running", **big)
    set_state(running, step=10, num_iterations=20000)
    dead = make_run(exp, ARMS[1], 0, bpb=0.95, state="running", pid=dead_pid(), **big)
    set_state(dead, num_iterations=20000)
    stalled = make_run(exp, ARMS[1], 1, bpb=0.97, state="running", **big)
    set_state(stalled, host="gpu-b", num_iterations=20000)
    old = time.time() - 3600
    for p in stalled.iterdir():
        os.utime(p, (old, old))
    rows = {r.run: r for r in experiment_status(exp, stall_after_s=600)}
    return exp, rows


def render(rows: list[RunStatus], width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(status_table(rows, title="fineweb-edu-top-vs-random (12:00:00)", width=width))
    return console.export_text().rstrip("\n").splitlines()


def test_states_and_dead_run_has_no_eta(runs) -> None:
    _, rows = runs
    assert {r: s.state for r, s in rows.items()} == {
        "edu-top16.5-s0": "done",
        "edu-top16.5-s1": "running",
        "random16.5-s0": "dead",
        "random16.5-s1": "STALLED",
    }
    assert rows["edu-top16.5-s1"].eta_s > 0 and rows["random16.5-s0"].eta_s is None
    dead_line = next(line for line in render(list(rows.values()), 200) if "random16.5-s0" in line)
    eta = [c.header for c in COLUMNS].index("ETA")
    assert re.split(r"\s*[│┃]\s*", dead_line.strip("│┃ "))[eta] == "-", dead_line


def test_narrow_layout_fits_80_columns(runs) -> None:
    _, rows = runs
    rows = list(rows.values())
    lines = render(rows, 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    text = "\n".join(lines)
    assert "…" not in text, text  # nothing cut: columns are dropped whole, by priority
    for r in rows:  # every run, whole, with its state, step and val bpb
        line = next(line for line in lines if r.run in line)
        assert r.state in line and f"{r.step}/{r.num_iterations}" in line and f"{r.val_bpb:.4f}" in line, line
    header = next(line for line in lines if " state " in line)
    assert "bpb" in header and "ETA" in header and "arm" not in header.split()  # the run name says the arm
    assert "MFU" not in header and "epoch" not in header  # the least important go first


def test_wide_terminal_gets_the_full_table(runs) -> None:
    _, rows = runs
    lines = render(list(rows.values()), 200)
    header = next(line for line in lines if "state" in line)
    for col in COLUMNS:
        assert (col.header in header) == (col.header != "job"), (col.header, header)  # no run has a job
    assert "5,242,880" in "\n".join(lines)  # full numbers when there is room


def armlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_piped_output_is_plain_lines(runs, tmp_path: Path) -> None:
    exp, rows = runs
    r = armlab("status", str(exp.workdir_path), cwd=tmp_path)  # stdout is a pipe here
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout and not re.search(r"[│┃━─┏┡└]", r.stdout), r.stdout
    title, header, *lines = r.stdout.rstrip("\n").splitlines()
    assert title.startswith("fineweb-edu-top-vs-random (")
    shown = [c for c in COLUMNS if c.header != "job"]  # the job column only with a scheduler's jobs
    assert header.split() == [c.header.replace(" ", "_") for c in shown]
    assert len(lines) == 4 and {line.split()[1] for line in lines} == set(rows)
    assert all(len(line.split()) == len(shown) for line in lines)  # one word per cell: awk-able


def test_json_is_one_object_per_run_with_every_field(runs, tmp_path: Path) -> None:
    exp, rows = runs
    r = armlab("status", str(exp.workdir_path), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    fields = [f.name for f in dataclasses.fields(RunStatus)]
    assert fields == [
        "arm", "run", "dir", "state", "step", "num_iterations", "tokens", "train_loss", "val_bpb",
        "tok_per_s", "mfu", "eta_s", "epoch", "last_log_age_s", "alive", "host", "error", "lane", "engine",
        "phase", "val_bpb_step", "job", "evaluating",
    ]  # fmt: skip  (the schema: a change here is a change for every script that reads it)
    assert [list(d) for d in data] == [fields] * 4
    by_run = {d["run"]: d for d in data}
    done = by_run["edu-top16.5-s0"]
    assert done["state"] == "done" and done["val_bpb"] == pytest.approx(0.8123) and done["tokens"] == 5_242_880
    assert done["dir"] == str(rows["edu-top16.5-s0"].dir) and done["host"] == socket.gethostname()
    assert by_run["random16.5-s0"]["state"] == "dead" and by_run["random16.5-s0"]["eta_s"] is None
    assert by_run["random16.5-s1"]["alive"] is None  # another host: cannot tell
    assert armlab("status", str(exp.workdir_path), "--json", "--watch", cwd=tmp_path).returncode == 2


def test_a_run_in_eval_shows_the_phase_and_the_step_of_its_bpb(runs, tmp_path: Path) -> None:
    """The trainer's state.json says what the ranks do (phase "eval" at step 12); the last val
    bpb came from step 10. 0.2 showed `running` and a bare bpb: a stall in a long eval looked like
    a stall in training, and a 250-step-old bpb like a current one."""
    exp, _ = runs
    running = next(p for p in exp.workdir_path.glob("arms/*/runs/edu-top16.5-s1"))
    set_state(running, step=12, phase="eval")
    rows = {r.run: r for r in experiment_status(exp, stall_after_s=600)}
    r = rows["edu-top16.5-s1"]
    assert (r.state, r.phase, r.step, r.val_bpb_step) == ("running", "eval", 12, 10)
    assert rows["edu-top16.5-s0"].phase is None and rows["edu-top16.5-s0"].val_bpb_step == 10  # done: no phase
    lines = render(list(rows.values()), 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    line = next(line for line in lines if "edu-top16.5-s1" in line)
    assert re.search(r" eval +12/20000 .* 0\.9000@10 ", line), line
    done = next(line for line in lines if "edu-top16.5-s0" in line)
    assert " done " in done and "0.8123 " in done and "@" not in done  # measured at the row's own step
    p = armlab("status", str(exp.workdir_path), cwd=tmp_path)
    piped = next(line for line in p.stdout.splitlines() if line.split()[1:2] == ["edu-top16.5-s1"])
    assert piped.split()[2] == "eval" and "0.9000@10" in piped.split()
    data = {d["run"]: d for d in json.loads(armlab("status", str(exp.workdir_path), "--json", cwd=tmp_path).stdout)}
    assert (data["edu-top16.5-s1"]["state"], data["edu-top16.5-s1"]["phase"]) == ("running", "eval")
    assert data["edu-top16.5-s1"]["val_bpb_step"] == 10


def test_a_done_run_being_evaluated_says_so_until_its_evaluator_is_gone(runs, tmp_path: Path) -> None:
    """`armlab evaluate` writes phase "eval" and its progress into a done run's state.json: status
    shows `done+eval:2/3` (one word piped, within 80 columns); an evaluator killed with SIGKILL
    (its pid gone) left them behind, and status shows a plain `done`, not an eval that runs no more."""
    exp, _ = runs
    done = next(p for p in exp.workdir_path.glob("arms/*/runs/edu-top16.5-s0"))
    ev = {"index": 2, "of": 3, "step": 9, "pid": os.getpid(), "host": socket.gethostname()}
    set_state(done, phase="eval", evaluating=ev)
    rows = {r.run: r for r in experiment_status(exp, stall_after_s=600)}
    r = rows["edu-top16.5-s0"]
    assert (r.state, r.phase, r.evaluating) == ("done", "eval", "2/3")
    lines = render(list(rows.values()), 80)
    assert max(len(line) for line in lines) <= 80 and "done+eval:2/3" in next(x for x in lines if "-s0" in x and "edu" in x)
    p = armlab("status", str(exp.workdir_path), cwd=tmp_path)
    piped = next(line for line in p.stdout.splitlines() if line.split()[1:2] == ["edu-top16.5-s0"])
    assert piped.split()[2] == "done+eval:2/3", piped
    set_state(done, evaluating={**ev, "pid": dead_pid()})
    r = next(r for r in experiment_status(exp, stall_after_s=600) if r.run == "edu-top16.5-s0")
    assert (r.state, r.phase, r.evaluating) == ("done", None, None)


def test_missing_workdir_says_so(tmp_path: Path) -> None:
    (tmp_path / "exp.toml").write_text(
        f'name = "x"\nworkdir = "{tmp_path / "nowhere"}"\n[pool]\nuri = "p"\n'
        '[[arms]]\nname = "a"\nkind = "random"\nratio = 0.5\n'
    )
    r = armlab("status", "exp.toml", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r.stdout  # no rows of "queued" runs
    (line,) = r.stderr.strip().splitlines()
    assert f"{tmp_path / 'nowhere'}: no such workdir" in line and "armlab run exp.toml" in line
    assert not (tmp_path / "nowhere").exists()


def test_scheduler_jobs_are_joined_with_the_runs(runs, tmp_path: Path) -> None:
    """A Slurm host's jobs (mirrored into remote/<host>/jobs.json) join their runs: a queued run
    shows its pending job and why, a running one its node and which job of its chain; at 80
    columns in squeue's short form, and whole in --json."""
    from armlab.ops.hosts.messages import JobView

    exp, _ = runs
    jobs = [JobView("edu-top16.5-s1", ARMS[0], "4826675", "RUNNING", "None", "n[1-2]", 2),
            JobView("random16.5-s0", ARMS[1], "4826676", "PENDING", "Resources", None, 1)]  # fmt: skip
    mirror = tmp_path / "wd" / "remote" / "cluster" / "jobs.json"
    mirror.parent.mkdir(parents=True)
    mirror.write_text(json.dumps([j.to_json() for j in jobs]))
    rows = {r.run: r for r in experiment_status(exp, stall_after_s=600)}
    assert rows["edu-top16.5-s1"].job == jobs[0] and rows["edu-top16.5-s0"].job is None
    assert jobs[0].describe() == "4826675 RUNNING on n[1-2], link 2"
    assert jobs[1].describe() == "4826676 PENDING (Resources)"
    lines = render(list(rows.values()), 80)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert "job" in next(line for line in lines if " state " in line)
    assert "4826675 R n[1-2] #2" in next(line for line in lines if "edu-top16.5-s1" in line)
    assert "4826676 PD Resources" in next(line for line in lines if "random16.5-s0" in line)
