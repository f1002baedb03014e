"""Runs across machines over SSH (armlab.ops.hosts.ssh): an entry with `nodes = [...]` trains each
run on all of them, one `armlab train` per node (node 0's lane runner leads, the other node's
follows it), meeting at node 0's master_port. Two real sshd on loopback are the two "nodes"; they
share the workdir (one machine), as a cluster's nodes share a network filesystem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_util import make_pool
from sshd_util import free_port, host_venv, sshd_hosts
from test_ops_hosts_slurm import same_run

pytestmark = pytest.mark.e2e

EXPERIMENT = """\
name = "two-nodes"
workdir = "{root}/local"

[pool]
uri = "{root}/pool"
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
total_batch_size = 128
num_iterations = {steps}
eval_every = {steps}
eval_tokens = 256
save_every = {steps}
compile = false
allow_repeat = true
seeds = [0]

[[hosts]]
name = "pair"
nodes = ["hosta", "hostb"]
arms = ["rand"]
device = "cpu"
nproc = 1
num_gpus = 0
master_port = {port}
python = "{python}"
workdir = "{root}/shared"
"""


def armlab(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_two_ssh_nodes_train_as_one_node_of_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 4
    make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
    with sshd_hosts(tmp_path / "sshd") as hosts:
        monkeypatch.setenv("ARMLAB_SSH_CONFIG", str(hosts.config))
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
        python = host_venv(tmp_path / "venv")
        exp = tmp_path / "exp.toml"
        exp.write_text(EXPERIMENT.format(root=tmp_path, steps=steps, port=free_port(), python=python))
        p = armlab("setup", str(exp), "--no-deps")
        assert p.returncode == 0 and p.stdout.count("pair:") == 2, p.stdout + p.stderr  # both nodes
        try:
            p = armlab("launch", str(exp))
            assert p.returncode == 0, p.stdout + p.stderr
            run = tmp_path / "shared/arms/rand/runs/rand-s0"
            deadline = time.monotonic() + 300
            while not ((run / "state.json").exists() and json.loads((run / "state.json").read_text())["state"] == "done"):
                assert time.monotonic() < deadline, (run / "train.log").read_text()[-2000:] if run.exists() else p.stderr
                time.sleep(0.5)
        finally:
            armlab("stop", str(exp), "--timeout", "20")
        # node 1's runner joined the run: its own plan and log beside node 0's
        follower = json.loads((tmp_path / "shared/lanes/pair.lane0.node1.state.json").read_text())
        assert follower["state"] == "done" and (run / "train.node1.log").exists()
        assert json.loads((run / "run.json").read_text())["config"]["world_size"] == 2
        ref = armlab("train", str(tmp_path / "shared/experiment.toml"), "--arm", "rand", "--seed", "0", "--run-name",
                     "one-node", "--device", "cpu", "--nproc", "2")  # fmt: skip
        assert ref.returncode == 0, ref.stderr[-2000:]
    diff = same_run(run, tmp_path / "shared/arms/rand/runs/one-node", steps)
    print(f"2 nodes x 1 rank (SSH) vs 1 node x 2 ranks: max abs weight difference {diff}")
    assert diff == 0.0
    assert not os.environ.get("ARMLAB_TEST_STEP_DELAY")
