"""The host-side agent (armlab.ops.hosts.agent): its table of typed ops, and what a stop says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from armlab.ops.hosts import agent
from armlab.ops.hosts.messages import HostProbe, StopRequest
from armlab.ops.lanes import StopRow
from armlab.runs import write_state


def test_a_stop_says_where_a_restart_begins(tmp_path: Path) -> None:
    """A stopped run resumes from its stop's checkpoint; with none yet it begins at step 0, and the
    stop says so (a user once restarted such a run from step 0 without being told)."""
    row = StopRow("rand", "rand-s0", 123, "stopped (SIGTERM)")
    write_state(tmp_path, state="stopped", resume_step=12)
    assert agent.with_restart(tmp_path, row).result == "stopped (SIGTERM); resumes from step 12"
    write_state(tmp_path, state="stopped", resume_step=None)
    assert agent.with_restart(tmp_path, row).result == (
        "stopped (SIGTERM); no checkpoint yet: a restart begins at step 0"
    )
    write_state(tmp_path, state="starting")  # killed before its trainer could answer the stop
    assert agent.with_restart(tmp_path, row).result.endswith("no checkpoint yet: a restart begins at step 0")
    queued = StopRow("rand", "rand-s1", None, "queued on lane local:0: not started")
    assert agent.with_restart(tmp_path, queued) == queued  # nothing stopped: nothing to add


def test_the_agent_speaks_typed_json_and_refuses_in_one_line(tmp_path: Path) -> None:
    """`python -m armlab.ops.hosts.agent OP EXP` reads its request on stdin and prints its answer as
    one JSON line; an unknown op or a request that does not fit its record is one line, exit 2."""
    exp = tmp_path / "exp.toml"
    exp.write_text(f'name = "agent"\nworkdir = "{tmp_path / "wd"}"\n[pool]\nuri = "/p"\n'
                   '[[arms]]\nname = "rand"\nkind = "random"\nratio = 0.5\n')  # fmt: skip
    slot = {"host": "h", "lane": 0, "position": 0, "arm": "rand", "seed": 0, "run": "rand-s0", "device": "cpu",
            "world_size": 1, "gpus": [], "port": None}  # fmt: skip

    def agent_cli(op: str, request: dict) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "armlab.ops.hosts.agent", op, str(exp)]
        return subprocess.run(cmd, input=json.dumps(request), capture_output=True, text=True, timeout=120)

    p = agent_cli("probe", {"slots": [slot]})
    assert p.returncode == 0, p.stderr
    probe = HostProbe.from_json(json.loads(p.stdout.strip().splitlines()[-1]))
    assert probe.runs["rand-s0"].pending and probe.data == {"rand": False}
    for op, request, needle in [
        ("nosuch", {}, "unknown agent op 'nosuch'"),
        ("slurm.nosuch", {}, "unknown agent op 'slurm.nosuch'"),
        ("stop", {"arms": ["rand"]}, "not a valid StopRequest (timeout: Field required)"),
    ]:
        p = agent_cli(op, request)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and needle in p.stderr, p.stderr
    assert StopRequest(["rand"], 5.0).to_json() == {"arms": ["rand"], "timeout": 5.0}
