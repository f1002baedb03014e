"""End to end on two real sshd "hosts": setup, doctor, launch two CPU arms in parallel, status, logs, stop.

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
    root, _, _ = cluster
    first, second = set_up
    lines = first.stdout.strip().splitlines()
    assert len(lines) == 2
    for host in ("hosta", "hostb"):
        line = next(ln for ln in lines if ln.startswith(host + ":"))
        assert "installed" in line and "torch 2." in line and "CUDA none" in line and "0 GPUs" in line
        # armlab came from the wheel setup installed in the host's venv, not the project's source tree
        p = subprocess.run(
            [str(root / host / "venv/bin/python"), "-c", "import armlab; print(armlab.__file__)"],
            capture_output=True, text=True,
        )  # fmt: skip
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
    assert "arms ask for 2 GPUs" in p.stderr and "armlab prepare EXP --arm rand" in p.stderr
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
    from armlab.ops.remote import mirror_remote_runs

    root, exp_path, _ = cluster
    exp = load_experiment(exp_path)
    # 1. A launch interrupted after the first host: only hosta's arm was started.
    p = armlab("launch", str(exp_path), "--host", "hosta")
    assert p.returncode == 0, p.stdout + p.stderr
    first = [ln.split("\t") for ln in p.stdout.strip().splitlines()]
    assert [(r[0], r[1], r[3]) for r in first] == [("hosta", "rand", "started")]
    pid_a = int(first[0][4].split()[1])
    # 2. The rerun reports hosta's live run (same pid, not restarted) and starts only hostb's.
    p = armlab("launch", str(exp_path))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {r[0]: r for r in (ln.split("\t") for ln in p.stdout.strip().splitlines())}
    assert rows["hosta"][3] == "already running" and int(rows["hosta"][4].split()[1]) == pid_a
    assert rows["hostb"][3] == "started"
    pid_b = int(rows["hostb"][4].split()[1])
    record = json.loads((root / "local" / "launch.json").read_text())
    assert {(r["host"], r["arm"], r["pid"]) for r in record["runs"]} == {
        ("hosta", "rand", pid_a),
        ("hostb", "top", pid_b),
    }
    # 3. The runs outlive the SSH sessions that started them and make progress: status mirrors them.
    deadline = time.time() + 240
    while True:
        dirs = mirror_remote_runs(exp)
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
    # 4. logs over SSH
    p = armlab("logs", str(exp_path), "--arm", "top", "-n", "5")
    assert p.returncode == 0 and "step " in p.stdout and len(p.stdout.strip().splitlines()) == 5
    # 5. stop: SIGTERM to each launcher, lease released, state stopped, processes gone
    p = armlab("stop", str(exp_path))
    assert p.returncode == 0, p.stderr
    assert sorted(ln.split("\t")[0] for ln in p.stdout.strip().splitlines()) == ["hosta", "hostb"]
    assert all("stopped (SIGTERM)" in ln for ln in p.stdout.strip().splitlines())
    for host, arm in (("hosta", "rand"), ("hostb", "top")):
        work = root / host / "work" / "arms" / arm
        assert json.loads((work / "runs" / f"{arm}-s0" / "state.json").read_text())["state"] == "stopped"
        assert not (work / "data" / ".lease").exists()
    for pid in (pid_a, pid_b):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    p = armlab("stop", str(exp_path))
    assert p.returncode == 0 and p.stdout.strip() == "no live runs"
