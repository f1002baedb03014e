"""The host seam's contract (armlab.ops.hosts), one suite run against every backend: this machine,
SSH (a real sshd on loopback, armlab installed on the "host" by `armlab setup`) and Slurm (the
real test cluster). Each step calls the `Host` protocol the orchestrator calls, checks the typed
answer, and checks that the answer survives its JSON form (what crosses a shell).

    check -> probe (nothing there) -> prepare -> probe (data, tokenizer) -> start -> start again
    (nothing new) -> mirror -> logs -> stop (the run stopped, resumable) -> probe (pending again)
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from armlab.ops.hosts import Host, get_host
from armlab.ops.hosts.local import LocalHost
from armlab.ops.schedule import local_host, plan_schedule
from armlab.records import Record
from armlab.spec import Experiment, load_experiment
from data_util import make_pool
from sshd_util import host_venv, sshd_hosts

pytestmark = pytest.mark.e2e

EXPERIMENT = """\
name = "contract"
workdir = "{workdir}"

[pool]
uri = "{pool}"
id_column = "id"

[eval]
docs = 60

[tokenizer]
vocab_size = 300
train_chars = 60000

[shards]
rows_per_shard = 200
row_group_rows = 32

[[arms]]
name = "rand"
kind = "random"
ratio = 0.5

[model]
depth = 1
max_seq_len = 32

[train]
device_batch_size = 2
total_batch_size = 64
num_iterations = 100000   # runs until stopped
eval_every = 100000
eval_tokens = 256
save_every = 5
compile = false
allow_repeat = true
seeds = [0]
"""


def roundtrip(answer: Record) -> None:
    """A typed answer is the same after its JSON form (what the agent prints and the client reads)."""
    again = type(answer).from_json(json.loads(json.dumps(answer.to_json())))
    assert again == answer


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contract-pool")
    make_pool(root / "pool", n_docs=1200, n_files=2)
    return root / "pool"


def _local(root: Path, pool: Path) -> Iterator[Host]:
    path = root / "exp.toml"
    path.write_text(EXPERIMENT.format(workdir=root / "wd", pool=pool))
    exp = load_experiment(path)
    yield LocalHost(exp, local_host(exp, ["rand"], device="cpu", visible_gpus=0))


def _ssh(root: Path, pool: Path) -> Iterator[Host]:
    with sshd_hosts(root / "sshd", aliases=("hosta",)) as hosts:
        old = os.environ.get("ARMLAB_SSH_CONFIG")
        os.environ["ARMLAB_SSH_CONFIG"] = str(hosts.config)
        try:
            python = host_venv(root / "venv")
            path = root / "exp.toml"
            path.write_text(
                EXPERIMENT.format(workdir=root / "local", pool=pool)
                + f'[[hosts]]\nname = "hosta"\nssh = "hosta"\narms = ["rand"]\ndevice = "cpu"\nnum_gpus = 0\n'
                f'python = "{python}"\nworkdir = "{root / "host-wd"}"\n'
            )
            p = subprocess.run(["armlab", "setup", str(path), "--no-deps"], capture_output=True, text=True, timeout=600)
            assert p.returncode == 0, p.stdout + p.stderr
            exp = load_experiment(path)
            host = get_host(exp, exp.hosts[0])
            try:
                yield host
            finally:
                host.stop(["rand"], 20)  # never leave a training process behind
        finally:
            if old is None:
                os.environ.pop("ARMLAB_SSH_CONFIG", None)
            else:
                os.environ["ARMLAB_SSH_CONFIG"] = old


BACKENDS = {"local": _local, "ssh": _ssh}


@pytest.fixture(params=sorted(BACKENDS))
def host(request: pytest.FixtureRequest, tmp_path: Path, pool: Path) -> Iterator[Host]:
    yield from BACKENDS[request.param](tmp_path, pool)


def _until(what: str, fn, timeout: float = 240):
    deadline = time.time() + timeout
    while not (value := fn()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def test_every_backend_honours_the_seam(host: Host, capfd: pytest.CaptureFixture[str]) -> None:
    exp: Experiment = host.exp
    slots = plan_schedule(exp, [host.spec]).select(hosts=[host.name])
    (slot,) = slots
    run = slot.run
    host.check(slots)

    # nothing there yet: the run is pending, no data, no tokenizer
    before = host.probe(slots)
    roundtrip(before)
    assert before.runs[run].pending and before.runs[run].state is None and not before.runs[run].alive
    assert before.data == {"rand": False} and before.tokenizer is None

    # the data steps on the host
    host.prepare(["rand"], "prepare")
    ready = host.probe(slots)
    assert ready.data == {"rand": True} and ready.tokenizer

    # start: detached, the run trains there; a second start starts nothing new
    started = host.start(slots)
    roundtrip(started)
    live = _until("the run to be live", lambda: (p := host.probe(slots)).runs[run].alive and p)
    again = host.start(slots)
    roundtrip(again)
    after = host.probe(slots)
    assert after.runs[run].alive and after.runs[run].pid == live.runs[run].pid
    assert after.jobs.keys() == live.jobs.keys() and all(
        after.jobs[r].job_id == live.jobs[r].job_id for r in after.jobs
    )

    # mirror: the run's small files, as status reads them
    def stepped():
        m = host.mirror()
        item = next((i for i in m.runs if i.run == run), None)
        state = json.loads(item.files.get("state.json", "{}")) if item else {}
        return m if state.get("step", 0) >= 1 and "train.log" in item.files else None

    mirrored = _until("a step in the mirror", stepped)
    roundtrip(mirrored)
    item = next(i for i in mirrored.runs if i.run == run)
    assert item.alive and json.loads(item.files["state.json"])["state"] == "running" and item.arm == "rand"

    # logs: the run's log on this terminal
    capfd.readouterr()
    assert host.logs("rand", run, 3, False) == 0
    shown = capfd.readouterr().out.strip().splitlines()
    assert len(shown) == 3 and any("step" in ln for ln in shown), shown

    # stop: the run stops resumably; it is pending again (the next start resumes it)
    rows = host.stop(["rand"], 30)
    assert [(r.host, r.arm, r.run) for r in rows] == [(host.name, "rand", run)]
    assert rows[0].result.startswith("stopped"), rows
    stopped = host.probe(slots)
    assert stopped.runs[run].state == "stopped" and stopped.runs[run].pending and not stopped.jobs
    assert host.stop(["rand"], 30) == []  # nothing lives any more
