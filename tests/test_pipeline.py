"""armlab.pipeline (`armlab run`): device requests that cannot be met are refused before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from armlab.errors import ArmlabError
from armlab.pipeline import run_experiment
from armlab.spec import parse_experiment


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA (this one has GPUs)")
def test_run_with_gpus_on_a_cpu_host_refuses_before_anything_starts(tmp_path: Path) -> None:
    exp = parse_experiment({
        "name": "nogpu", "workdir": str(tmp_path / "wd"), "pool": {"uri": str(tmp_path / "pool")},
        "arms": [{"name": "rand", "kind": "random", "ratio": 0.5}],
    })  # fmt: skip
    with pytest.raises(ArmlabError, match=r"--num-gpus 2 but 0 GPUs visible.*use --device cpu"):
        run_experiment(exp, num_gpus=2)
    with pytest.raises(ArmlabError, match=r"--num-gpus is for CUDA"):
        run_experiment(exp, num_gpus=2, device="cpu")
    assert not (tmp_path / "wd").exists()  # no workdir, no prepare, nothing written


def run_toml(root: Path, steps: int = 4, seeds: str = "[0, 1]") -> str:
    from hosts_util import tiny_toml

    return tiny_toml("run-lanes", root / "wd", root / "pool", top=True, steps=steps, batch=128, seeds=seeds)


@pytest.mark.e2e
def test_run_trains_every_arm_and_seed_on_two_lanes(tmp_path: Path) -> None:
    """`armlab run` on 2 arms x 2 seeds with two CPU runs at once: all four train, seed-major on
    two lanes (each arm's seeds one after another, the two arms side by side), then evaluate and
    compare; a rerun trains nothing."""
    import json
    import subprocess
    import sys

    from data_util import make_pool

    make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
    exp = tmp_path / "exp.toml"
    exp.write_text(run_toml(tmp_path))
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "run", str(exp), "--device", "cpu",
           "--runs-at-once", "2"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "run: 4 runs on 2 lanes of 1 cpu rank" in " ".join(p.stderr.split())  # unwrapped
    d = {r: tmp_path / "wd" / "arms" / r.split("-")[0] / "runs" / r for r in ("rand-s0", "rand-s1", "top-s0", "top-s1")}
    st = {r: json.loads((rd / "state.json").read_text()) for r, rd in d.items()}
    assert {s["state"] for s in st.values()} == {"done"}
    assert all((rd / "eval.json").is_file() for rd in d.values())
    # lane local:0 trained rand's seeds in order, lane local:1 top's, in two processes at once
    assert st["rand-s0"]["pid"] == st["rand-s1"]["pid"] != st["top-s0"]["pid"] == st["top-s1"]["pid"]
    assert st["rand-s1"]["started"] >= st["rand-s0"]["ended"] and st["top-s1"]["started"] >= st["top-s0"]["ended"]
    assert st["top-s0"]["started"] < st["rand-s0"]["ended"] and st["rand-s0"]["started"] < st["top-s0"]["ended"]
    assert json.loads((tmp_path / "wd/report/summary.json").read_text())["comparisons"]
    # a rerun: every run done already, none trained again
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    said = " ".join(p.stderr.split())
    assert said.count("already done") == 4 and "training" not in said
    assert {r: json.loads((rd / "state.json").read_text()) for r, rd in d.items()} == st


def _pipeline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    from data_util import make_pool

    if not (tmp_path / "pool").exists():
        make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
        (tmp_path / "exp.toml").write_text(run_toml(tmp_path, seeds="[0]"))
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "run", str(tmp_path / "exp.toml"),
           "--device", "cpu", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_run_until_decided_adds_seeds_on_the_lanes_and_stops_saying_why(tmp_path: Path) -> None:
    """First one arm's run: a success with nothing to compare (before: exit 2, compare refused a
    single arm). Then `armlab run --until-decided --max-seeds 2` on train.seeds = [0]: one seed
    measures no seed noise, so seed 1 of both arms is added and trains on the lane like any other
    run; at 2 seeds the loop stops (the most it may use), saying why, and compare counts the
    added seed at the loop's level (Bonferroni over its 2 looks)."""
    import json

    p = _pipeline(tmp_path, "--arm", "rand", "--seed", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    said = " ".join(p.stderr.split())
    assert "only arm 'rand' has finished runs" in said and "nothing to compare yet" in said
    assert not (tmp_path / "wd/report").exists()

    p = _pipeline(tmp_path, "--until-decided", "--max-seeds", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    said = " ".join(p.stderr.split())
    assert "top vs rand: 1 seed each, no seed noise measured yet" in said and "adding seed 1 to rand, top" in said
    assert "lane local:0: training top-s1" in said and "decide: stop: " in said
    saved = json.loads((tmp_path / "wd/seeds.json").read_text())
    assert saved["arms"] == {"rand": [1], "top": [1]} and saved["max_seeds"] == 2 and len(saved["rounds"]) == 2
    summary = json.loads((tmp_path / "wd/report/summary.json").read_text())
    for arm in ("rand", "top"):
        assert [r["seed"] for r in summary["arms"][arm]["runs"]] == [0, 1]
        assert summary["arms"][arm]["planned_seeds"] == [0, 1]
        st = json.loads((tmp_path / f"wd/arms/{arm}/runs/{arm}-s1/state.json").read_text())
        assert st["state"] == "done" and (tmp_path / f"wd/arms/{arm}/runs/{arm}-s1/eval.json").is_file()
    assert all(c["interval"]["level"] == pytest.approx(1 - 0.05 / 2) for c in summary["comparisons"])
    assert summary["decided"] and "until decided" in (tmp_path / "wd/report/report.md").read_text()
    # a plain rerun keeps the added seed in the run set: nothing trains again
    p = _pipeline(tmp_path)
    assert p.returncode == 0 and " ".join(p.stderr.split()).count("already done") == 4


@pytest.mark.e2e
def test_a_second_run_is_refused_and_a_killed_lane_is_named(tmp_path: Path) -> None:
    """Two `armlab run` on one workdir: the second is refused at once, naming the first (it used to
    end "2 runs failed" with nothing failed). Then the lane runners of the first are killed -9:
    the first ends exit 1 saying each lane died, which run it trained and how to resume it (it
    used to call the dead runs "running")."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from data_util import make_pool

    make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
    exp = tmp_path / "exp.toml"
    exp.write_text(run_toml(tmp_path, steps=200, seeds="[0]"))
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "run", str(exp), "--device", "cpu",
           "--runs-at-once", "2"]  # fmt: skip
    env = {**os.environ, "ARMLAB_TEST_STEP_DELAY": "0.2"}  # slow steps: the runs are mid-way below
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    states = {arm: tmp_path / f"wd/arms/{arm}/runs/{arm}-s0/state.json" for arm in ("rand", "top")}
    deadline = time.time() + 300
    while not all(p.exists() and json.loads(p.read_text()).get("step", 0) >= 1 for p in states.values()):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert second.returncode == 2, second.stdout + second.stderr
    said = " ".join(second.stderr.split())
    assert f"run in {tmp_path / 'wd'}: busy: held by pid {first.pid}" in said and "failed" not in said
    runners = {arm: json.loads(p.read_text())["pid"] for arm, p in states.items()}  # each lane's runner
    for pid in runners.values():
        os.kill(pid, signal.SIGKILL)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 1, out + err
    said = " ".join(err.split())
    for lane, arm in (("local:0", "rand"), ("local:1", "top")):
        assert (
            f"lane {lane} died: its runner (pid {runners[arm]}) was killed by SIGKILL while training {arm}-s0; "
            "rerun `armlab run` to resume it from its last checkpoint" in said
        ), said
    assert "2 runs failed" in said and "running" not in said.split("2 runs failed")[1]
