"""End to end on two real sshd "hosts": setup, doctor, launch two CPU arms in parallel, status, logs,
stop; and the schedule of several seeds per host: side by side on two lanes, one after another on one.

Both hosts are this machine behind two sshd instances, each with its own venv and workdir. The
venvs hold what the project installs (`sshd_util.host_venv`: the project's packages, not the
base interpreter's) and `armlab setup --no-deps` installs armlab's wheel into them, so the test
stays offline. Every step goes through the real `armlab` CLI and real SSH; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from armlab.spec import load_experiment
from armlab.workdir import read_leases
from data_util import make_pool
from sshd_util import host_venv, sshd_hosts

pytestmark = pytest.mark.e2e


def armlab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["armlab", *args], capture_output=True, text=True, timeout=timeout)


def host_toml(root: Path, name: str, arm: str, nproc: int, extra: str = "") -> str:
    return (
        f'[[hosts]]\nname = "{name}"\nssh = "{name}"\narms = ["{arm}"]\ndevice = "cpu"\nnproc = {nproc}\n'
        f'num_gpus = 0\nmaster_port = 29500\npython = "{root / name / "venv/bin/python"}"\n'
        f'workdir = "{root / name / "work"}"\n{extra}\n'
    )


EXPERIMENT = """\
name = "remote-e2e"
workdir = "{root}/local"

[pool]
uri = "{root}/pool"
id_column = "id"

[eval]
docs = 100

[tokenizer]
vocab_size = 400
train_chars = 200000

[shards]
rows_per_shard = 300
row_group_rows = 64

[[arms]]
name = "rand"
kind = "random"
ratio = 0.5
seed = 42

[[arms]]
name = "top"
kind = "top"
ratio = 0.5
score_column = "score"

[model]
depth = 2
max_seq_len = 64

[train]
device_batch_size = 4
total_batch_size = 512      # 4 x 64 x 2: one rank accumulates 2 micro-steps, two ranks 1
num_iterations = 100000     # runs until stopped
eval_every = 50
eval_tokens = 2048
save_every = 20
compile = false
allow_repeat = true
seeds = [0, 1]              # one lane per host: seed 1 waits behind seed 0 (which never ends)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("cluster")
    make_pool(root / "pool", n_docs=3000, n_files=4)
    exp = root / "exp.toml"
    exp.write_text(
        EXPERIMENT.format(root=root)
        + host_toml(root, "hosta", "rand", 1)
        + host_toml(root, "hostb", "top", 2)
    )
    with sshd_hosts(root / "sshd") as hosts:
        old = os.environ.get("ARMLAB_SSH_CONFIG")
        os.environ["ARMLAB_SSH_CONFIG"] = str(hosts.config)
        try:
            yield root, exp, hosts
        finally:
            armlab("stop", str(exp), "--timeout", "20")  # never leave training processes behind
            if old is None:
                os.environ.pop("ARMLAB_SSH_CONFIG", None)
            else:
                os.environ["ARMLAB_SSH_CONFIG"] = old


@pytest.fixture(scope="module")
def set_up(cluster):
    root, exp, _ = cluster
    for host in ("hosta", "hostb"):
        host_venv(root / host / "venv")
    args = ["setup", str(exp), "--no-deps"]
    first = armlab(*args, timeout=600)
    assert first.returncode == 0, first.stderr
    return first, armlab(*args, timeout=600)


def test_setup_installs_once_and_reports_the_host(cluster, set_up):
    root, _, hosts = cluster
    first, second = set_up
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 2
    for host in ("hosta", "hostb"):
        line = next(ln for ln in lines if ln.startswith(host + ":"))
        assert "installed" in line and "torch 2." in line and "CUDA none" in line and "0 GPUs" in line
        # on the host, armlab comes from the wheel setup installed in its venv, not this source tree
        p = hosts.ssh(host, f"{root / host / 'venv/bin/python'} -c 'import armlab; print(armlab.__file__)'")
        assert p.stdout.startswith(str(root / host / "venv" / "lib")), p.stdout + p.stderr
    assert second.returncode == 0 and second.stdout.count("already up to date") == 2, (
        second.stdout + second.stderr
    )


def test_doctor_on_each_host(cluster, set_up):
    root, exp, _ = cluster
    p = armlab("doctor", str(exp), "--no-expect-data", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    reports = {r["host"]: {c["name"]: c for c in r["checks"]} for r in json.loads(p.stdout)}
    assert set(reports) == {"hosta", "hostb"}
    assert reports["hosta"]["armlab"]["status"] == "ok" and "data rand" in reports["hosta"]
    assert str(root / "hostb" / "work") in reports["hostb"]["data top"]["detail"]  # the host's own workdir
    # A host asked for more GPUs than it has (none here), with `--prepare-mode skip` and no data
    # there yet: refused before anything starts, both problems named with their fixes.
    gpu_exp = root / "gpu.toml"
    gpu_exp.write_text(
        exp.read_text().replace(
            'device = "cpu"\nnproc = 1\nnum_gpus = 0', 'device = "cuda"\nnproc = 1\nnum_gpus = 2'
        )
    )
    p = armlab("launch", str(gpu_exp), "--host", "hosta", "--prepare-mode", "skip")
    assert p.returncode == 2 and "nothing was started" in p.stderr
    host_exp = root / "hosta" / "work" / "experiment.toml"  # the fix names the host's own copy of the file
    assert "arms ask for 2 GPUs" in p.stderr and f"armlab prepare {host_exp} --arm rand" in p.stderr, p.stderr
    assert not (root / "hosta" / "work" / "arms" / "rand" / "runs").exists()


def _steps(mirror: Path) -> int:
    log = mirror / "train.log"
    if not log.exists():
        return -1
    steps = [
        int(ln.split()[1].split("/")[0])
        for ln in log.read_text().splitlines()
        if ln.startswith("step ") and "loss" in ln
    ]
    return max(steps, default=-1)


def test_launch_status_logs_stop(cluster, set_up):
    from armlab.ops.orchestrator import mirror_hosts

    root, exp_path, _ = cluster
    exp = load_experiment(exp_path)
    # 1. A launch interrupted after the first host: only hosta's lane was started; its second
    #    seed waits behind the first on the same lane (one run at a time there).
    p = armlab("launch", str(exp_path), "--host", "hosta")
    assert p.returncode == 0, p.stdout + p.stderr
    first = [ln.split("\t") for ln in p.stdout.strip().splitlines()]
    assert [(r[0], r[1], r[2], r[3], r[6]) for r in first] == [
        ("hosta", "rand", "rand-s0", "started", "hosta:0"),
        ("hosta", "rand", "rand-s1", "queued", "hosta:0"),
    ]
    pid_a = int(first[0][4].split()[1])
    assert int(first[1][4].split()[1]) == pid_a  # one runner per lane trains its runs in order
    # 2. The rerun reports hosta's live run (same pid, not restarted) and starts only hostb's lane.
    p = armlab("launch", str(exp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r[2]: r for r in (ln.split("\t") for ln in p.stdout.strip().splitlines())}
    assert rows["rand-s0"][3] == "already running" and int(rows["rand-s0"][4].split()[1]) == pid_a
    assert rows["rand-s1"][3] == "queued"
    assert rows["top-s0"][3] == "started" and rows["top-s1"][3] == "queued"
    pid_b = int(rows["top-s0"][4].split()[1])
    record = json.loads((root / "local" / "launch.json").read_text())
    assert {(r["host"], r["run"], r["pid"]) for r in record["runs"]} == {
        ("hosta", "rand-s0", pid_a), ("hosta", "rand-s1", pid_a),
        ("hostb", "top-s0", pid_b), ("hostb", "top-s1", pid_b),
    }  # fmt: skip
    # 3. The runs outlive the SSH sessions that started them and make progress: status mirrors them.
    deadline = time.time() + 240
    while True:
        dirs = mirror_hosts(exp)
        if len(dirs) == 2 and all(_steps(d) >= 2 for d in dirs):
            break
        assert time.time() < deadline, f"runs made no progress: {[(d, _steps(d)) for d in dirs]}"
        time.sleep(2)
    by_host = {d.relative_to(root / "local" / "remote").parts[0]: d for d in dirs}
    assert by_host["hosta"] == root / "local/remote/hosta/arms/rand/runs/rand-s0"
    for host, d in by_host.items():
        state = json.loads((d / "state.json").read_text())
        assert state["state"] == "running", (host, state)
        assert json.loads((d / "remote.json").read_text())["alive"] is True
        assert (d / "metrics.jsonl").read_text().strip()
    runs = [json.loads((d / "run.json").read_text()) for d in by_host.values()]
    assert runs[0]["fingerprint"] == runs[1]["fingerprint"]  # comparable by construction
    # each host trained its own tokenizer from the same sample: the same one
    assert runs[0]["tokenizer_fingerprint"] == runs[1]["tokenizer_fingerprint"]
    assert {r["config"]["world_size"] for r in runs} == {1, 2}
    # status sees every run with its lane, the queued seeds too (from the hosts' lanes)
    p = armlab("status", str(exp_path), "--json")
    assert p.returncode == 0, p.stderr
    status = {r["run"]: r for r in json.loads(p.stdout)}
    assert {r: (status[r]["state"], status[r]["lane"]) for r in ("rand-s1", "top-s1")} == {
        "rand-s1": ("queued", "hosta:0"), "top-s1": ("queued", "hostb:0"),
    }  # fmt: skip
    assert status["rand-s0"]["lane"] == "hosta:0" and status["rand-s0"]["state"] in ("running", "STALLED")
    # 4. logs over SSH
    p = armlab("logs", str(exp_path), "--arm", "top", "-n", "5")
    assert p.returncode == 0 and "step " in p.stdout and len(p.stdout.strip().splitlines()) == 5
    # 5. stop: SIGTERM to each lane's runner (the supervisor of its run), lease released, state
    #    stopped, processes gone; each lane's queued seed is named and never starts
    p = armlab("stop", str(exp_path))
    assert p.returncode == 0, p.stderr
    lines = sorted(ln.split("\t") for ln in p.stdout.strip().splitlines())
    for ln in (ln for ln in lines if "SIGTERM" in ln[4]):  # the run checkpointed first: the stop says where it resumes
        st = json.loads((root / ln[0] / "work" / "arms" / ln[1] / "runs" / ln[2] / "state.json").read_text())
        assert ln[4].endswith(f"; resumes from step {st['resume_step']}") and st["resume_step"] > 0, ln
    assert [(ln[0], ln[2], ln[4].split("; ")[0]) for ln in lines] == [
        ("hosta", "rand-s0", "stopped (SIGTERM)"), ("hosta", "rand-s1", "queued on lane hosta:0: not started"),
        ("hostb", "top-s0", "stopped (SIGTERM)"), ("hostb", "top-s1", "queued on lane hostb:0: not started"),
    ]  # fmt: skip
    for host, arm in (("hosta", "rand"), ("hostb", "top")):
        work = root / host / "work" / "arms" / arm
        assert json.loads((work / "runs" / f"{arm}-s0" / "state.json").read_text())["state"] == "stopped"
        assert not (work / "runs" / f"{arm}-s1").exists()
        assert read_leases(work / "data") == []
        lane = json.loads((root / host / "work" / "lanes" / f"{host}.lane0.state.json").read_text())
        assert lane["state"] == "stopped"
    for pid in (pid_a, pid_b):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    p = armlab("stop", str(exp_path))
    assert p.returncode == 0 and p.stdout.strip() == "no live runs"


SEEDS_EXPERIMENT = """\
name = "remote-seeds"
workdir = "{root}/local-seeds"

[pool]
uri = "{root}/pool"
id_column = "id"

[eval]
docs = 100

[tokenizer]
vocab_size = 400
train_chars = 200000

[shards]
rows_per_shard = 300
row_group_rows = 64

[[arms]]
name = "rand"
kind = "random"
ratio = 0.5
seed = 42

[[arms]]
name = "top"
kind = "top"
ratio = 0.5
score_column = "score"

[model]
depth = 2
max_seq_len = 64

[train]
device_batch_size = 4
total_batch_size = 512
num_iterations = 6
eval_every = 6
eval_tokens = 1024
save_every = 6
compile = false
allow_repeat = true
seeds = [0, 1]

[[hosts]]                   # two lanes of two CPU ranks: both seeds side by side, each on its own port
name = "hosta"
ssh = "hosta"
arms = ["rand"]
device = "cpu"
nproc = 2
runs_at_once = 2
num_gpus = 0
master_port = {port}
python = "{root}/hosta/venv/bin/python"
workdir = "{root}/hosta/seeds"

[[hosts]]                   # one lane: seed 1 after seed 0; no master_port (one rank needs none)
name = "hostb"
ssh = "hostb"
arms = ["top"]
device = "cpu"
nproc = 1
num_gpus = 0
python = "{root}/hostb/venv/bin/python"
workdir = "{root}/hostb/seeds"
"""


def test_launch_trains_seeds_side_by_side_and_one_after_another(cluster, set_up):
    from sshd_util import free_port_range

    root = cluster[0]
    port = free_port_range(2)  # lane k of hosta binds port + k
    exp_path = root / "seeds.toml"
    exp_path.write_text(SEEDS_EXPERIMENT.format(root=root, port=port))
    runs = {
        "rand-s0": root / "hosta/seeds/arms/rand/runs/rand-s0", "rand-s1": root / "hosta/seeds/arms/rand/runs/rand-s1",
        "top-s0": root / "hostb/seeds/arms/top/runs/top-s0", "top-s1": root / "hostb/seeds/arms/top/runs/top-s1",
    }  # fmt: skip
    p = armlab("launch", str(exp_path), timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r[2]: r for r in (ln.split("\t") for ln in p.stdout.strip().splitlines())}
    assert {run: (r[3], r[6]) for run, r in rows.items()} == {
        "rand-s0": ("started", "hosta:0"), "rand-s1": ("started", "hosta:1"),
        "top-s0": ("started", "hostb:0"), "top-s1": ("queued", "hostb:0"),
    }  # fmt: skip
    pid = {run: int(r[4].split()[1]) for run, r in rows.items()}
    assert pid["rand-s0"] != pid["rand-s1"] and pid["top-s0"] == pid["top-s1"]

    def state(run: str) -> dict:
        path = runs[run] / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    deadline = time.time() + 400
    while not all(state(r).get("state") == "done" for r in runs):
        failed = {r: state(r).get("error") for r in runs if state(r).get("state") in ("failed", "stopped")}
        assert not failed and time.time() < deadline, failed or {r: state(r).get("state") for r in runs}
        time.sleep(1)
    st = {r: state(r) for r in runs}
    plans = {r: json.loads((d / "plan.json").read_text()) for r, d in runs.items()}
    # each run of hosta had its own lane: its own runner, its own master port, two ranks; the
    # two trained at the same time
    assert (plans["rand-s0"]["master_port"], plans["rand-s1"]["master_port"]) == (port, port + 1)
    assert plans["rand-s0"]["world_size"] == plans["rand-s1"]["world_size"] == 2
    assert st["rand-s0"]["pid"] == pid["rand-s0"] and st["rand-s1"]["pid"] == pid["rand-s1"]
    assert st["rand-s1"]["started"] < st["rand-s0"]["ended"] and st["rand-s0"]["started"] < st["rand-s1"]["ended"]
    # hostb's lane trained its two seeds one after another, in one runner, each binding no fixed port
    assert plans["top-s0"]["master_port"] is plans["top-s1"]["master_port"] is None
    assert st["top-s0"]["pid"] == st["top-s1"]["pid"] == pid["top-s0"]
    assert st["top-s1"]["started"] >= st["top-s0"]["ended"]
    # a CPU lane trains on its own share of the host's cores, as a GPU lane on its own GPUs
    cores = [
        next((ln for ln in (root / "hosta/seeds/lanes" / f"hosta.lane{k}.log").read_text().splitlines()
              if "on cores" in ln), "")
        for k in (0, 1)
    ]  # fmt: skip
    if len(os.sched_getaffinity(0)) >= 2:
        a, b = ({int(c) for c in line.split("on cores ")[1].split(" ")[0].split(",")} for line in cores)
        assert a and b and not a & b, cores
    # status shows each run's lane, from the hosts' lane files
    p = armlab("status", str(exp_path), "--json")
    assert p.returncode == 0, p.stderr
    assert {r["run"]: (r["state"], r["lane"]) for r in json.loads(p.stdout)} == {
        "rand-s0": ("done", "hosta:0"), "rand-s1": ("done", "hosta:1"),
        "top-s0": ("done", "hostb:0"), "top-s1": ("done", "hostb:0"),
    }  # fmt: skip
    # a rerun is a no-op: every run reported done, nothing started, no state file touched
    watched = [d / "state.json" for d in runs.values()] + sorted(root.glob("host*/seeds/lanes/*.state.json"))
    before = {f: f.read_bytes() for f in watched}
    p = armlab("launch", str(exp_path), timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {ln.split("\t")[3] for ln in p.stdout.strip().splitlines()} == {"already done"}
    assert {f: f.read_bytes() for f in watched} == before
