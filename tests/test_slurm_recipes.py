"""The batch-script recipes the Slurm backend uses, proven on the test cluster (tests/slurm_util.py).

- RENDEZVOUS: one torchrun per node under srun, c10d rendezvous on the first node (torch 2.13);
  also the static form (--node-rank=$SLURM_NODEID). Every rank sees the all-reduced sum.
- PREEMPTIBLE: `--signal=USR1@N` makes Slurm send SIGUSR1, N s before the time limit, to every
  process of every job step (sbatch(1) --signal: "By default all job steps will be signaled, but not
  the batch shell itself"): torchrun and its workers alike. torchrun 2.13 dies of SIGUSR1 unless told
  otherwise (its handled signals default to TERM, INT, HUP, QUIT), and with
  `--signals-to-handle=...,SIGUSR1` it re-sends it to the workers, kills them after its shutdown
  timeout and exits 1 with a traceback. So the step's shell ignores USR1 before it execs torchrun
  (SIG_IGN is inherited; the training script installs its own handler), the workers checkpoint and
  exit 0, torchrun exits 0. torchrun cannot pass a worker's exit code on (any failure is exit 1), so
  the trainer's "stopped, resumable" reaches the batch script as a file; the script then submits the
  next link (`--dependency=afterany:$SLURM_JOB_ID`) and exits 130, which Slurm records (ExitCode=130:0).
The scancel-based tests deliver the signal the way --signal=USR1@N does (both signal the steps, not
the batch shell; test_slurm_cluster.py's time-limit test shows the two agree), without waiting for a
time limit.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

import pytest

from slurm_util import SlurmCluster

pytestmark = pytest.mark.e2e

# The first node's address (the batch script runs on it: BatchHost is the allocation's first node).
# NodeAddr is what Slurm itself connects to: the hostname on most clusters, 127.0.0.1 on the test one.
# The port is probed free on that node; torchrun binds it a moment later.
ADDR = r"""first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
addr=$(scontrol show node "$first" -o | sed -n 's/.* NodeAddr=\([^ ]*\) .*/\1/p')
"""
PORT = r"""port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
"""
# One torchrun per node. c10d: node 0 hosts the rendezvous store (is_host: explicit, because every
# "node" of the test cluster is this machine and the endpoint is loopback, which torchrun's guess
# would take for its own on both); --local-addr: the address this node's agent gives its workers.
TORCHRUN_C10D = r"""srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec python -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$1" \
  --rdzv-backend=c10d --rdzv-endpoint="$0" --rdzv-id="$SLURM_JOB_ID" \
  --rdzv-conf=is_host=$(( SLURM_NODEID == 0 )) \
  --local-addr="$(scontrol show node "$SLURMD_NODENAME" -o | sed -n "s/.* NodeAddr=\([^ ]*\) .*/\1/p")" \
  --max-restarts=0 "${@:2}"' "$addr:$port" """
# Static: node ranks are Slurm's node ids, node 0 serves the store at the master address.
TORCHRUN_STATIC = r"""srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'trap "" USR1; exec python -m torch.distributed.run \
  --nnodes="$SLURM_JOB_NUM_NODES" --node-rank="$SLURM_NODEID" --nproc-per-node="$1" \
  --master-addr="${0%:*}" --master-port="${0#*:}" --max-restarts=0 "${@:2}"' "$addr:$port" """

ALLREDUCE = """\
import os
import sys
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
# One file per rank (argv[1] names the launch): ranks of two nodes printing into one job output
# can lose or merge lines there.
line = f"rank={dist.get_rank()} world={dist.get_world_size()} node={os.environ['SLURM_NODEID']} sum={t.item():g}"
out = os.path.join(sys.argv[1], f"rank{dist.get_rank()}")
with open(out + ".tmp", "w") as f:
    f.write(line + "\\n")
os.replace(out + ".tmp", out)
dist.destroy_process_group()
"""

# A training process in miniature: steps until `total` or until SIGUSR1/SIGTERM, every rank agreeing
# on the step (all-reduce of the stop flag), then rank 0 saves the step and says how it ended.
STOPPABLE = """\
import os, signal, sys, time
from pathlib import Path
import torch
import torch.distributed as dist

stop = False
def on_signal(signum, frame):
    global stop
    stop = True

signal.signal(signal.SIGUSR1, on_signal)
signal.signal(signal.SIGTERM, on_signal)
dist.init_process_group("gloo")
rank = dist.get_rank()
run, total = Path(sys.argv[1]), int(sys.argv[2])
ckpt = run / "ckpt"
step = int(ckpt.read_text()) if ckpt.exists() else 0
print(f"rank {rank}: from step {step}", flush=True)
(run / f"ready{rank}").touch()
while step < total:
    flag = torch.tensor([float(stop)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        break
    step += 1
    time.sleep(0.05)
if rank == 0:
    ckpt.write_text(str(step))
    (run / ("done" if step == total else "stopped")).write_text(str(step))
dist.destroy_process_group()
"""


def _with_torch(c: SlurmCluster) -> SlurmCluster:
    """The cluster seen from an env (passed on to the jobs: sbatch exports it) with this venv's python
    first on PATH, one thread per rank and gloo on loopback."""
    bin_dir = str(Path(sys.executable).parent)
    env = c.env | {"PATH": f"{bin_dir}:{c.env['PATH']}", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    return dataclasses.replace(c, env=env)


def _script(path: Path, sbatch: list[str], body: str) -> Path:
    path.write_text("#!/bin/bash\n" + "".join(f"#SBATCH {o}\n" for o in sbatch) + "set -u\n" + body)
    return path


def test_torchrun_on_two_nodes_c10d_and_static(slurm_2nodes: SlurmCluster, tmp_path: Path):
    c = _with_torch(slurm_2nodes)
    (tmp_path / "allreduce.py").write_text(ALLREDUCE)
    for launch in ("c10d", "static"):
        (tmp_path / launch).mkdir()
    body = (
        ADDR
        + PORT
        + TORCHRUN_C10D
        + "2 allreduce.py c10d\necho static\n"
        + PORT
        + TORCHRUN_STATIC
        + "1 allreduce.py static\n"
    )
    script = _script(tmp_path / "job.sbatch", ["--nodes=2", "--ntasks-per-node=1"], body)
    job = c.sbatch("-o", str(tmp_path / "out"), str(script), cwd=tmp_path)
    rec = c.wait_job(job, timeout=300)
    out = (tmp_path / "out").read_text()
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), out
    c10d, static = (
        [re.fullmatch(r"rank=(\d) world=(\d) node=(\d) sum=(\d+)\n", f.read_text()).groups()
         for f in sorted((tmp_path / launch).glob("rank*"))]
        for launch in ("c10d", "static")
    )  # fmt: skip
    # world = 2 nodes x 2 processes, every rank sees 1 + 2 + 3 + 4. c10d numbers the nodes in the order
    # their agents joined (rank 0 may be on n2), a node's ranks together.
    assert sorted((r, w, s) for r, w, _, s in c10d) == [
        ("0", "4", "10"),
        ("1", "4", "10"),
        ("2", "4", "10"),
        ("3", "4", "10"),
    ]
    node = {int(r): n for r, _, n, _ in c10d}
    assert node[0] == node[1] != node[2] == node[3]
    # static: node rank = SLURM_NODEID (one process per node here)
    assert sorted(static) == [("0", "2", "0", "3"), ("1", "2", "1", "3")]


def test_preemptible_job_checkpoints_on_usr1_and_chains_the_next_link(
    slurm_2nodes: SlurmCluster, tmp_path: Path
):
    """Link 1 gets SIGUSR1 in its steps, its workers stop at the same step and save, the script sees
    the `stopped` file, submits link 2 after itself and exits 130; link 2 resumes and finishes."""
    c = _with_torch(slurm_2nodes)
    (tmp_path / "stoppable.py").write_text(STOPPABLE)
    run, script = tmp_path, tmp_path / "link.sbatch"
    body = (
        f'echo "$SLURM_JOB_ID" >> {run}/chain\n' + ADDR + PORT + TORCHRUN_C10D + f"1 stoppable.py {run} 40\n"
        f"""rc=$?
if [ "$rc" = 0 ] && [ -e {run}/stopped ]; then  # stopped, resumable: the next link runs after this one
  rm {run}/stopped {run}/ready*
  echo "next link: $(sbatch --parsable --dependency=afterany:"$SLURM_JOB_ID" {script})"
  exit 130
fi
exit "$rc"
"""
    )  # fmt: skip
    sbatch = ["--nodes=2", "--ntasks-per-node=1", "--signal=USR1@120", f"--output={run}/%j.out"]
    first = c.sbatch(str(_script(script, sbatch, body)), cwd=run)
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{r}").exists() for r in (0, 1)):  # both ranks stepping
        assert time.monotonic() < deadline and c.job_state(first) in ("PENDING", "RUNNING"), c.job(first)
        time.sleep(0.1)
    c.run("scancel", "--signal=USR1", first)
    rec = c.wait_job(first, timeout=240)
    assert (rec["JobState"], rec["ExitCode"]) == ("FAILED", "130:0"), (tmp_path / f"{first}.out").read_text()
    stopped_at = int((tmp_path / "ckpt").read_text())
    assert 0 < stopped_at < 40
    second = re.search(r"^next link: (\d+)$", (tmp_path / f"{first}.out").read_text(), re.M)[1]
    rec2 = c.wait_job(second, timeout=240)
    out2 = (tmp_path / f"{second}.out").read_text()
    assert (rec2["JobState"], rec2["ExitCode"]) == ("COMPLETED", "0:0"), out2
    assert (tmp_path / "chain").read_text().split() == [first, second]
    assert rec2["StartTime"] >= rec["EndTime"]
    assert f"rank 0: from step {stopped_at}" in out2 and (tmp_path / "done").read_text() == "40"
