"""SSH transport and the refusals made before anything starts, against real sshd on loopback."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.ops.orchestrator import hosts_of, machine_labels, select_hosts
from armlab.ops.schedule import plan_schedule
from armlab.ops.ssh import Remote
from armlab.spec import load_experiment
from sshd_util import SshHosts, sshd_hosts


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory):
    with sshd_hosts(tmp_path_factory.mktemp("sshd")) as h:
        yield h


@pytest.fixture(autouse=True)
def _ssh_config(hosts: SshHosts, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ARMLAB_SSH_CONFIG", str(hosts.config))
    monkeypatch.setenv("ARMLAB_SSH_CONNECT_TIMEOUT", "2")


def test_run_put_and_resolve(hosts: SshHosts, tmp_path: Path):
    r = Remote("a", "hosta")
    assert r.run("echo $((6 * 7))").stdout.strip() == b"42"
    src = tmp_path / "payload.bin"
    src.write_bytes(bytes(range(256)) * 100)
    dest = tmp_path / "remote side" / "dir" / "payload.bin"  # a space: quoting must hold
    r.put(src, str(dest))
    assert dest.read_bytes() == src.read_bytes()
    assert not list(dest.parent.glob("*.armlab-tmp*"))
    assert r.resolve() == ("127.0.0.1", hosts.ports["hosta"])
    # A failing remote command is one line naming the host and the command's own error.
    with pytest.raises(ArmlabError, match=r"host 'a': probe failed: .*nope"):
        r.run("ls /nope", what="probe")


def test_auth_failure_is_one_line(hosts: SshHosts):
    with pytest.raises(ArmlabError) as e:
        Remote("gpu-a", "badkey").run("true")
    msg = str(e.value)
    assert "authentication failed" in msg and "ssh-copy-id badkey" in msg and "\n" not in msg
    # and through the CLI: exit 2, one line, no traceback
    p = subprocess.run(["armlab", "setup", "badkey"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "authentication failed" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_unreachable_host_times_out_quickly():
    # A TCP listener that never speaks SSH: the connect succeeds, the banner never comes.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.time()
        with pytest.raises(ArmlabError, match=r"unreachable \(no answer within 2s\)"):
            Remote("gpu-b", "127.0.0.1", port=port).run("true")
        assert time.time() - t0 < 10
    with pytest.raises(ArmlabError, match="connection refused"):
        Remote("gpu-c", "127.0.0.1", port=port).run("true")  # now closed


def exp_file(tmp_path: Path, hosts_toml: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(
        f'name = "refuse"\nworkdir = "{tmp_path / "w"}"\n[pool]\nuri = "/tmp/pool"\n'
        '[[arms]]\nname = "a"\nkind = "random"\nratio = 0.5\n'
        '[[arms]]\nname = "b"\nkind = "random"\nratio = 0.5\nseed = 1\n' + hosts_toml
    )
    return p


def host(name: str, ssh: str, arms: str, port: int = 29500, extra: str = "") -> str:
    return f'[[hosts]]\nname = "{name}"\nssh = "{ssh}"\narms = [{arms}]\nmaster_port = {port}\n{extra}'


def test_same_machine_same_master_port_is_refused(hosts: SshHosts, tmp_path: Path):
    # `hosta` (an alias) and `root@127.0.0.1 -p <its port>` are the same sshd: the playbook's clash.
    sshd_port = hosts.ports["hosta"]
    exp = load_experiment(
        exp_file(
            tmp_path, host("x", "hosta", '"a"') + host("y", "127.0.0.1", '"b"', extra=f"port = {sshd_port}\n")
        )
    )
    machines = machine_labels(hosts_of(exp))
    assert machines["x"] == machines["y"] == f"127.0.0.1:{sshd_port}"
    with pytest.raises(
        ArmlabError,
        match=r"hosts 'x' and 'y' are the same machine .* master_port 29500.*set master_port = 29501",
    ):
        plan_schedule(exp, machines=machines)
    # different ports on one machine are fine, and each gets its own block of GPUs
    exp = load_experiment(
        exp_file(
            tmp_path,
            host("x", "hosta", '"a"')
            + host("y", "127.0.0.1", '"b"', 29501, f"port = {sshd_port}\nnum_gpus = 4\n"),
        )
    )
    slots = {s.host: s for s in plan_schedule(exp, machines=machine_labels(hosts_of(exp))).slots}
    assert slots["x"].cuda_visible_devices == "0,1,2,3,4,5,6,7" and slots["y"].cuda_visible_devices == "8,9,10,11"
    # two different machines (two sshd) may both use 29500, and both count their GPUs from 0
    exp = load_experiment(exp_file(tmp_path, host("x", "hosta", '"a"') + host("y", "hostb", '"b"')))
    slots = {s.host: s for s in plan_schedule(exp, machines=machine_labels(hosts_of(exp))).slots}
    assert slots["x"].gpus[0] == slots["y"].gpus[0] == 0 and slots["x"].port == slots["y"].port == 29500


def test_other_refusals(tmp_path: Path):
    # several arms on one entry are fine now: their runs share its lanes (armlab.ops.schedule)
    exp = load_experiment(exp_file(tmp_path, host("x", "hosta", '"a", "b"')))
    assert {s.arm for s in plan_schedule(exp).slots} == {"a", "b"}
    with pytest.raises(ArmlabError, match="arm 'a' is assigned to two hosts"):
        plan_schedule(
            load_experiment(exp_file(tmp_path, host("x", "hosta", '"a"') + host("y", "hostb", '"a"', 29501)))
        )
    with pytest.raises(ArmlabError, match="unknown arm 'zz'"):
        load_experiment(exp_file(tmp_path, host("x", "hosta", '"zz"')))
    exp = load_experiment(exp_file(tmp_path, host("x", "hosta", '"a"')))
    with pytest.raises(ArmlabError, match="--host nope: no such host"):
        select_hosts(exp, ["nope"])
    with pytest.raises(ArmlabError, match="no arm named 'zz'"):
        select_hosts(exp, arms=["zz"])
    p = subprocess.run(
        ["armlab", "launch", str(exp_file(tmp_path, ""))], capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2 and "has no [[hosts]]" in p.stderr and len(p.stderr.strip().splitlines()) == 1
