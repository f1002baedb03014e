"""The host seam's contract (armlab.ops.hosts), one suite run against every backend: this machine,
SSH (a real sshd on loopback) and Slurm (the real test cluster), its login node this machine or
reached over SSH. Each step calls the `Host` protocol the orchestrator calls, checks the typed
answer, and checks that the answer survives its JSON form (what crosses a shell).

    check -> probe (nothing there) -> prepare -> probe (data, tokenizer) -> start -> start again
    (nothing new) -> mirror -> logs -> stop (the run stopped, resumable) -> probe (pending again)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from armlab.ops.hosts import Host, get_host
from armlab.ops.hosts.local import LocalHost
from armlab.ops.schedule import local_host, plan_schedule
from armlab.records import Record
from armlab.spec import Experiment, load_experiment
from data_util import make_pool
from hosts_util import tiny_toml, until
from sshd_util import sshd_hosts

pytestmark = pytest.mark.e2e

def experiment(workdir: Path, pool: Path, hosts: str = "") -> str:
    return tiny_toml("contract", workdir, pool, steps=100_000, save_every=5, hosts=hosts)  # runs until stopped


def roundtrip(answer: Record) -> None:
    """A typed answer is the same after its JSON form (what the agent prints and the client reads)."""
    again = type(answer).from_json(json.loads(json.dumps(answer.to_json())))
    assert again == answer


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("contract-pool")
    make_pool(root / "pool", n_docs=1200, n_files=2)
    return root / "pool"


def _host(root: Path, pool: Path, entry: str = "") -> Iterator[Host]:
    """The experiment with one [[hosts]] entry (none: this machine), as a Host; its runs stopped after."""
    path = root / "exp.toml"
    path.write_text(experiment(root / "local", pool, entry))
    exp = load_experiment(path)
    host = get_host(exp, exp.hosts[0]) if exp.hosts else LocalHost(exp, local_host(exp, ["rand"], device="cpu",
                                                                                     visible_gpus=0))  # fmt: skip
    try:
        yield host
    finally:
        host.stop(["rand"], 20)  # never leave a training process behind


def _local(root: Path, pool: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    yield from _host(root, pool)


def _ssh(root: Path, pool: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """A machine over SSH; it runs this checkout's armlab (`armlab setup` is test_remote_launch's subject)."""
    with sshd_hosts(root / "sshd", aliases=("hosta",)) as hosts:
        request.getfixturevalue("monkeypatch").setenv("ARMLAB_SSH_CONFIG", str(hosts.config))
        yield from _host(root, pool, f'[[hosts]]\nname = "hosta"\nssh = "hosta"\narms = ["rand"]\ndevice = "cpu"\n'
                                     f'num_gpus = 0\npython = "{sys.executable}"\nworkdir = "{root / "host-wd"}"\n')  # fmt: skip


def _slurm(root: Path, pool: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """The session's test cluster (tests/slurm_util.py); its login node is this machine."""
    cluster = request.getfixturevalue("slurm")
    request.getfixturevalue("monkeypatch").setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    yield from _host(root, pool, '[[hosts]]\nname = "cluster"\nscheduler = "slurm"\npartition = "cpu"\n'
                                 f'arms = ["rand"]\ndevice = "cpu"\nworkdir = "{root / "cluster-wd"}"\n')  # fmt: skip


def _slurm_over_ssh(root: Path, pool: Path, request: pytest.FixtureRequest) -> Iterator[Host]:
    """The cluster's login node over SSH (a real sshd whose sessions see the test cluster)."""
    cluster = request.getfixturevalue("slurm")
    with sshd_hosts(root / "sshd", aliases=("login",), env={"SLURM_CONF": cluster.env["SLURM_CONF"]}) as hosts:
        request.getfixturevalue("monkeypatch").setenv("ARMLAB_SSH_CONFIG", str(hosts.config))
        yield from _host(root, pool, '[[hosts]]\nname = "cluster"\nscheduler = "slurm"\nssh = "login"\n'
                                     f'partition = "cpu"\narms = ["rand"]\ndevice = "cpu"\npython = "{sys.executable}"\n'
                                     f'workdir = "{root / "cluster-wd"}"\n')  # fmt: skip


BACKENDS = {"local": _local, "ssh": _ssh, "slurm": _slurm, "slurm_over_ssh": _slurm_over_ssh}


@pytest.fixture(params=sorted(BACKENDS))
def host(request: pytest.FixtureRequest, tmp_path: Path, pool: Path) -> Iterator[Host]:
    yield from BACKENDS[request.param](tmp_path, pool, request)


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
    # live, and its supervisor has written state.json (a scheduler's job is alive before that)
    live = until("the run to be live", lambda: (p := host.probe(slots)).runs[run].alive and p.runs[run].pid and p)
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

    mirrored = until("a step in the mirror", stepped)
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
    resume = json.loads(host.mirror().runs[0].files["state.json"])["resume_step"]  # it checkpointed first
    assert rows[0].result.startswith("stopped") and rows[0].result.endswith(f"; resumes from step {resume}"), rows
    stopped = host.probe(slots)
    assert stopped.runs[run].state == "stopped" and stopped.runs[run].pending and not stopped.jobs
    assert host.stop(["rand"], 30) == []  # nothing lives any more
