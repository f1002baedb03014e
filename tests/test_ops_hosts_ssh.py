"""Runs across machines over SSH (armlab.ops.hosts.ssh): an entry with `nodes = [...]` trains each
run on all of them, one `armlab train` per node (node 0's lane runner leads, the other node's
follows it), meeting at node 0's master_port. Two real sshd on loopback are the two "nodes"; they
share the workdir (one machine), as a cluster's nodes share a network filesystem."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from data_util import make_pool
from hosts_util import armlab, same_run, tiny_toml, until
from sshd_util import free_port, sshd_hosts

pytestmark = pytest.mark.e2e

PAIR = """
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


def test_two_ssh_nodes_train_as_one_node_of_two_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    steps = 4
    make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
    with sshd_hosts(tmp_path / "sshd") as hosts:
        monkeypatch.setenv("ARMLAB_SSH_CONFIG", str(hosts.config))
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
        exp = tmp_path / "exp.toml"
        # the nodes run this checkout's armlab (`armlab setup` is test_remote_launch's subject)
        host = PAIR.format(port=free_port(), python=sys.executable, root=tmp_path)
        exp.write_text(tiny_toml("two-nodes", tmp_path / "local", tmp_path / "pool", steps=steps, batch=128, hosts=host))
        try:
            p = armlab("launch", str(exp))
            assert p.returncode == 0, p.stdout + p.stderr
            run = tmp_path / "shared/arms/rand/runs/rand-s0"
            state = lambda: json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {}  # noqa: E731
            until("the 2-node run to finish", lambda: state().get("state") in ("done", "failed"))
            assert state()["state"] == "done", (run / "train.log").read_text()[-2000:]
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
