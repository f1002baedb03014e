"""armlab.ops.lanes: a lane's runner trains its queue in order, picks up runs appended while it
lives, survives a kill -9 (the next runner resumes the run), stops whole, and hands each lane its
own GPUs through CUDA_VISIBLE_DEVICES.

Real runner processes (`python -m armlab.ops.lanes`) on a tiny prepared workdir (train_util)
with the built-in engine on CPU; nothing is mocked.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import torch

from armlab import runs
from armlab.errors import ArmlabError
from armlab.ops.lanes import LaneFiles, read_lane_state, read_lanes, start_lanes, stop_lanes, visible_devices
from armlab.ops.schedule import Slot, plan_schedule
from armlab.spec import HostSpec
from armlab.workdir import open_workdir
from train_util import ARM, build_workdir, experiment, train_losses, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("lanes"))


def slot(seed: int, lane: int = 0) -> Slot:
    return Slot(host="local", lane=lane, position=seed, arm=ARM, seed=seed, run=f"{ARM}-s{seed}", device="cpu",
                world_size=1, gpus=(), port=None)  # fmt: skip


def test_visible_devices_count_among_the_gpus_the_host_shows() -> None:
    assert visible_devices((2, 3), None) == "2,3"
    assert visible_devices((0, 1), "4,5,6,7") == "4,5"  # a container showing GPUs 4-7 as 0-3
    assert visible_devices((1,), "GPU-aaa,GPU-bbb") == "GPU-bbb"
    with pytest.raises(ArmlabError, match=r"a lane needs GPU 3 but CUDA_VISIBLE_DEVICES=0,1 shows 2"):
        visible_devices((2, 3), "0,1")


def test_a_lane_queues_resumes_after_kill_and_stops_whole(exp_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARMLAB_TEST_STEP_DELAY", "0.15")  # slow enough to act mid-run
    base = experiment(exp_file)
    exp = base.model_copy(update={"train": base.train.model_copy(update={"num_iterations": 16, "seeds": [0, 1, 2]})})
    wd = open_workdir(exp, create=False)
    files = LaneFiles.of(wd.root, slot(0))
    d = {s: wd.run_dir(ARM, f"{ARM}-s{s}") for s in range(3)}

    # a runner for seed 0; a second start while it lives appends seeds 1 and 2 to its queue
    (first,) = start_lanes(wd, exp, [[slot(0)]])
    assert first.action == "started" and first.error is None
    assert runs.read_state(d[0])["pid"] == first.pid  # the runner supervises the run itself
    (again,) = start_lanes(wd, exp, [[slot(0), slot(1), slot(2)]])
    assert (again.action, again.pid) == ("running", first.pid)

    # kill -9 after the checkpoint at step 8: the run shows dead, the lane's lock goes with it
    wait_for(lambda: max(train_losses(d[0]), default=0) >= 10, timeout=120, what="step 10 of seed 0")
    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait()
    assert runs.observed_state(runs.read_state(d[0]), None, 600, 0) == runs.RunState.DEAD
    assert [v.label() for v in read_lanes(wd.root)] == ["local:0 (dead)"]

    # a new runner resumes seed 0 from its checkpoint, then trains seed 1; stopped there, the lane
    # stops whole: seed 1 stopped (resumable), seed 2 never started
    (second,) = start_lanes(wd, exp, [[slot(0), slot(1), slot(2)]])
    assert second.action == "started" and second.pid != first.pid
    wait_for(lambda: max(train_losses(d[1]), default=0) >= 2, timeout=180, what="seed 1 training")
    assert runs.read_state(d[0])["state"] == "done" and "resumed from step 8" in (d[0] / "train.log").read_text()
    rows = stop_lanes(wd, [ARM], timeout=30)
    assert [(r.run, r.result) for r in rows] == [
        (f"{ARM}-s1", "stopped (SIGTERM)"),
        (f"{ARM}-s2", "queued on lane local:0: not started"),
    ]
    second.proc.wait(30)
    assert runs.read_state(d[1])["state"] == "stopped" and not d[2].exists()
    assert read_lane_state(files).state == "stopped" and not psutil.pid_exists(second.pid)
    assert stop_lanes(wd, [ARM], timeout=30) == []  # nothing lives any more

    # the next start resumes seed 1 and trains seed 2: the whole queue done, seed 0 untouched
    done0 = runs.read_state(d[0])
    (third,) = start_lanes(wd, exp, [[slot(0), slot(1), slot(2)]])
    third.proc.wait(240)
    assert [runs.read_state(d[s])["state"] for s in range(3)] == ["done"] * 3
    assert runs.read_state(d[0]) == done0 and sorted(train_losses(d[1])) == list(range(1, 17))
    assert read_lane_state(files).state == "done" and read_lane_state(files).failures == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA: on a GPU host the lanes would train")
def test_each_cuda_lane_gets_its_own_gpus(exp_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner of a CUDA lane sees only the lane's GPUs. With no GPU here each lane's first run
    is refused by its plan, and the refusal names the CUDA_VISIBLE_DEVICES the runner was given."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the host shows four GPUs as 0-3
    exp = experiment(exp_file)
    host = HostSpec(name="gpu", ssh="gpu", arms=[ARM], num_gpus=4, gpus_per_run=2)
    exp = exp.model_copy(update={"train": exp.train.model_copy(update={"seeds": [7, 8]})})
    lanes = plan_schedule(exp, [host]).lanes()
    starts = start_lanes(open_workdir(exp, create=False), exp, lanes)
    errors = {s.lane: s.error for s in starts}
    assert set(errors) == {"gpu:0", "gpu:1"}
    assert "--num-gpus 2 but 0 GPUs visible (CUDA_VISIBLE_DEVICES=4,5)" in errors["gpu:0"]
    assert "--num-gpus 2 but 0 GPUs visible (CUDA_VISIBLE_DEVICES=6,7)" in errors["gpu:1"]
    for s in starts:
        s.proc.wait(60)
    # refused before anything was written: no run dir, the lane says why
    assert not open_workdir(exp, create=False).run_dir(ARM, f"{ARM}-s7").exists()
    views = {v.id: v for v in read_lanes(open_workdir(exp, create=False).root)}
    assert views["gpu:0"].state == "failed" and f"{ARM}-s7" in views["gpu:0"].failures
    # status: the refused seed is failed (not queued forever), with its lane and the reason
    from armlab.ops.status import experiment_status

    row = next(r for r in experiment_status(exp) if r.run == f"{ARM}-s7")
    assert (row.state, row.lane) == ("failed", "gpu:0") and "CUDA_VISIBLE_DEVICES=4,5" in row.error
