"""armlab.runs: run states, the one liveness rule, metrics.jsonl with torn lines, rank errors, stop.

Liveness is checked against real processes: a sleeping child (live), the same child after it
exited but before it was reaped (a zombie: dead), and a pid of another host (cannot tell).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armlab import runs
from armlab.errors import ArmlabError
from armlab.runs import RunState


def state(**fields) -> dict:
    return {"state": "running", "pid": os.getpid(), "host": socket.gethostname(), **fields}


def test_is_live_is_an_active_state_with_a_live_pid_of_this_host() -> None:
    assert runs.is_live(state()) and runs.is_live(state(state="starting"))
    for done in ("done", "failed", "stopped"):
        assert not runs.is_live(state(state=done))  # pid alive, but the run is over
    assert not runs.is_live(state(host="elsewhere")) and runs.owner_alive(state(host="elsewhere")) is None
    assert not runs.is_live(state(pid=None)) and not runs.is_live({}) and not runs.is_live(None)


def test_a_zombie_is_dead_and_so_is_an_exited_pid() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert runs.is_live(state(pid=child.pid))
        child.send_signal(signal.SIGKILL)
        time.sleep(0.3)  # exited, not yet reaped: a zombie
        assert not runs.is_live(state(pid=child.pid)) and runs.owner_alive(state(pid=child.pid)) is False
    finally:
        child.wait()
    assert not runs.is_live(state(pid=child.pid))


def test_observed_state_derives_dead_and_stalled() -> None:
    now = time.time()
    assert runs.observed_state(state(), now - 5, 60, now) == RunState.RUNNING
    assert runs.observed_state(state(), now - 120, 60, now) == "STALLED"
    assert runs.observed_state(state(host="elsewhere"), now - 120, 60, now) == RunState.STALLED
    assert runs.observed_state(state(pid=2**22 + 12345), now, 60, now) == RunState.DEAD
    assert runs.observed_state(state(state="done"), now - 9999, 60, now) == "done"
    assert runs.observed_state(state(state="exploded"), now, 60, now) == RunState.UNREADABLE


def test_write_state_keeps_other_fields_and_writes_plain_strings(tmp_path: Path) -> None:
    runs.write_state(tmp_path, state=RunState.RUNNING, pid=7, step=3)
    runs.write_state(tmp_path, step=4)
    st = json.loads((tmp_path / runs.STATE_JSON).read_text())
    assert (
        st["state"] == "running" and st["pid"] == 7 and st["step"] == 4 and st["host"] == socket.gethostname()
    )


def test_read_metrics_skips_and_counts_torn_lines(tmp_path: Path) -> None:
    good = [{"step": s, "train_loss": 4.0 - s / 10} for s in range(1, 4)]
    lines = [json.dumps(good[0]), '{"step": 2, "train_lo', json.dumps(good[1]), "not json", '["a list"]',
             '{"no_step": 1}', '{"step": true}', "", json.dumps(good[2])]  # fmt: skip
    (tmp_path / runs.METRICS_JSONL).write_bytes(("\n".join(lines) + "\n").encode() + b'{"step": 4, "\xff')
    m = runs.read_metrics(tmp_path)
    assert m.records == good and m.last_step == 3
    assert m.torn == [2, 4, 5, 6, 7, 10] and m.unterminated
    assert runs.read_metrics(tmp_path / "nowhere") == runs.Metrics([])


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    (tmp_path / runs.METRICS_JSONL).write_text(
        "".join(json.dumps({"step": s, "val_bpb": 1.0}) + "\n" for s in range(0, 10)) + '{"step": 10, "x'
    )
    runs.truncate_metrics(tmp_path, 6)
    m = runs.read_metrics(tmp_path)
    assert [r["step"] for r in m.records] == list(range(7)) and not m.torn and not m.unterminated


def test_rank_errors_round_trip_earliest_first(tmp_path: Path) -> None:
    runs.write_rank_error(tmp_path, runs.RankError(2, "error", "RuntimeError: late", 20.0, "tb"))
    runs.write_rank_error(tmp_path, runs.RankError(1, "bad_input", "bad shard", 10.0))
    runs.rank_error_file(tmp_path, 3).write_text("{torn")  # a rank killed mid-write
    assert [(e.rank, e.kind) for e in runs.read_rank_errors(tmp_path)] == [(1, "bad_input"), (2, "error")]
    runs.clear_rank_errors(tmp_path)
    assert runs.read_rank_errors(tmp_path) == []


def test_load_run_reads_everything_and_names_a_torn_run_json(tmp_path: Path) -> None:
    d = tmp_path / "arms" / "top" / "runs" / "top-s0"
    d.mkdir(parents=True)
    with pytest.raises(ArmlabError, match="not a run dir"):
        runs.load_run(d)
    (d / runs.RUN_JSON).write_text(json.dumps({"arm": "top", "run": "top-s0", "seed": 0}))
    (d / runs.METRICS_JSONL).write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "val_bpb": 1.5}\n{"st')
    rec = runs.load_run(d)
    assert rec.arm == "top" and rec.state is None and rec.state_name == "starting" and not rec.live
    assert rec.final_val_bpb == 1.5 and rec.torn_metrics == [3]
    (d / runs.RUN_JSON).write_text('{"arm": ')
    with pytest.raises(ArmlabError, match=r"run\.json: unreadable JSON"):
        runs.load_run(d)


SUPERVISOR = """
import signal, sys, time
from armlab import runs
d = sys.argv[1]
def stop(*_):
    runs.write_state(d, state="stopped", error="stopped by SIGTERM")
    sys.exit(1)
signal.signal(signal.SIGTERM, stop if sys.argv[2] == "polite" else signal.SIG_IGN)
import os
runs.write_state(d, state="running", pid=os.getpid())
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["polite", "deaf"])
def test_stop_run_terms_then_kills(tmp_path: Path, kind: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), kind], start_new_session=True)
    try:
        deadline = time.time() + 30
        while runs.read_state(tmp_path).get("pid") != proc.pid:
            assert time.time() < deadline and proc.poll() is None, "supervisor did not start"
            time.sleep(0.05)
        stopped = runs.stop_run(tmp_path, timeout=1.0 if kind == "deaf" else 10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert stopped is not None and stopped.pid == proc.pid
    st = runs.read_state(tmp_path)
    if kind == "polite":  # the supervisor wrote its own state on SIGTERM
        assert stopped.result == "stopped (SIGTERM)" and st["error"] == "stopped by SIGTERM"
    else:  # killed: stop_run marks the state it could not write
        assert stopped.result == "stopped (SIGKILL after 1s)" and "SIGKILL" in st["error"]
    assert st["state"] == "stopped" and proc.returncode != 0
    assert runs.stop_run(tmp_path, 1.0) is None  # not active any more


def test_stop_run_leaves_other_hosts_alone(tmp_path: Path) -> None:
    runs.write_state(tmp_path, state="running", pid=os.getpid(), host="gpu-box-7")
    assert runs.stop_run(tmp_path, 1.0) == runs.Stopped(os.getpid(), "runs on gpu-box-7, not here")
    assert runs.read_state(tmp_path)["state"] == "running"


def test_engine_differences_name_the_run_and_the_key(tmp_path: Path) -> None:
    def rec(name: str, engine: dict | None, comparable: dict | None) -> runs.RunRecord:
        info = {
            "run": name,
            **({"engine": engine} if engine else {}),
            **({"engine_comparable": comparable} if comparable else {}),
        }
        return runs.RunRecord(dir=tmp_path / name, info=info, state=None)

    old = rec("old-s0", None, None)  # written before engines were recorded: the built-in trainer
    built = rec("b-s0", {"engine": "builtin"}, {})
    assert old.engine == "builtin" and runs.engine_differences([old, built]) == []
    a = rec("a-s0", {"engine": "nanochat"}, {"commit": "92d63d4", "diff_sha256": None})
    b = rec("b-s1", {"engine": "nanochat"}, {"commit": "48804bf", "diff_sha256": None})
    c = rec("c-s0", {"engine": "nanochat"}, {"commit": "92d63d4", "diff_sha256": None})
    assert runs.engine_differences([a, c]) == []
    assert runs.engine_differences([a, b, c, built]) == [  # the majority build (a, c) is the reference
        f"{tmp_path / 'b-s1'} (differs from the other 2 runs (a-s0, c-s0) in engine.commit (92d63d4 vs 48804bf))",
        f"{tmp_path / 'b-s0'} (differs from the other 2 runs (a-s0, c-s0) in engine.commit (92d63d4 vs none), "
        "engine.diff_sha256 (None vs none), engine.name (nanochat vs builtin))",
    ]
    # the odd one out is the minority, wherever it comes in the list (issue 20)
    assert runs.engine_differences([b, a, c]) == [
        f"{tmp_path / 'b-s1'} (differs from the other 2 runs (a-s0, c-s0) in engine.commit (92d63d4 vs 48804bf))"
    ]
    tie = runs.engine_differences([a, b])
    assert tie == [f"{tmp_path / 'b-s1'} (differs from a-s0 in engine.commit (92d63d4 vs 48804bf) "
                   "(no build has most runs: which is right is yours to say))"]  # fmt: skip


def test_state_json_is_a_typed_record_that_keeps_what_it_does_not_know(tmp_path: Path) -> None:
    (tmp_path / runs.STATE_JSON).write_text(json.dumps({"state": "running", "pid": 7, "step": 3, "newer_field": [1]}))
    rec = runs.read_run_state(tmp_path)
    assert (rec.state, rec.pid, rec.step, rec.phase, rec.resume_step) == ("running", 7, 3, None, None)
    runs.write_state(tmp_path, state=RunState.STOPPED, resume_step=3, stop_reason="SIGUSR1", phase=None)
    back = json.loads((tmp_path / runs.STATE_JSON).read_text())
    assert back["newer_field"] == [1] and back["state"] == "stopped" and back["resume_step"] == 3
    with pytest.raises(TypeError):
        runs.write_state(tmp_path, resum_step=4)  # a typo is an error, not a new key
    (tmp_path / runs.STATE_JSON).write_text(json.dumps({"state": "running", "step": "three"}))
    with pytest.raises(ArmlabError, match=r"state.json: not a valid StateRecord \(step"):
        runs.read_run_state(tmp_path)
    assert runs.read_run_state(tmp_path / "nowhere") is None and runs.read_state(tmp_path / "nowhere") == {}


def test_metrics_have_one_writer_of_typed_strict_records(tmp_path: Path) -> None:
    log = runs.MetricsLog(tmp_path)
    log.append(runs.MetricsRecord(step=1, tokens=10, time=0.5, train_loss=4.0, dt=0.5))
    log.append(runs.MetricsRecord(step=1, tokens=10, time=0.5, val_bpb=3.0))
    with pytest.raises(ValueError):
        log.append(runs.MetricsRecord(step=2, tokens=20, time=1.0, train_loss=float("nan")))  # no NaN line
    train, evaluation = runs.read_metrics(tmp_path).records
    assert train == {"step": 1, "tokens": 10, "time": 0.5, "train_loss": 4.0, "lr_mult": None, "dt": 0.5,
                     "tok_per_s": None, "mfu": None, "epoch": None}  # fmt: skip
    assert evaluation == {"step": 1, "tokens": 10, "time": 0.5, "val_bpb": 3.0}
    assert runs.MetricsRecord.from_json(train) == runs.MetricsRecord(step=1, tokens=10, time=0.5, train_loss=4.0, dt=0.5)
