"""`armlab launch` on a real Slurm cluster (tests/slurm_util.py: slurmctld + slurmd on loopback, this
machine as the login node): 2 arms x 2 seeds as four jobs, through to `compare`, and the refusals
made before anything is submitted.

Waits are bounded polls on what Slurm and the run dirs say, never sleeps: the test asserts what
happened, not when. A job that cannot start is made so by a job holding every CPU of the node.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from data_util import make_pool
from hosts_util import armlab, same_run, tiny_toml, until
from slurm_util import SlurmCluster

pytestmark = pytest.mark.e2e

SLURM_HOST = """
[[hosts]]
name = "cluster"
scheduler = "slurm"
partition = "{partition}"
arms = ["rand"{top}]
device = "cpu"
nproc = {nproc}
{extra}
"""


RUNS = ("rand-s0", "top-s0", "rand-s1", "top-s1")


def rows(p: subprocess.CompletedProcess[str]) -> dict[str, list[str]]:
    """`armlab launch`'s lines by run: host, arm, run, action, pid, run dir, lane."""
    return {r[2]: r for r in (ln.split("\t") for ln in p.stdout.strip().splitlines())}


def status(env: dict[str, str], exp: Path) -> dict[str, dict]:
    p = armlab("status", str(exp), "--json", env=env)
    assert p.returncode == 0, p.stderr
    return {r["run"]: r for r in json.loads(p.stdout)}


@pytest.fixture
def setup(slurm: SlurmCluster, tmp_path: Path):
    make_pool(tmp_path / "pool", n_docs=1200, n_files=2)
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "ARMLAB_TEST_STEP_DELAY": "0.2"}

    def write(partition: str = "cpu", extra: str = "", nproc: int = 1) -> Path:
        exp = tmp_path / "exp.toml"
        host = SLURM_HOST.format(partition=partition, top=', "top"', nproc=nproc,
                                 extra="cpus_per_task = 2  # the node's 4 CPUs hold two runs at a time\n" + extra)  # fmt: skip
        batch = 64 * nproc  # device batch 2 x 32 tokens, one micro-step per rank
        exp.write_text(tiny_toml("slurm-e2e", tmp_path / "wd", tmp_path / "pool", top=True, steps=12, batch=batch,
                                 seeds="[0, 1]", save_every=4, hosts=host))  # fmt: skip
        return exp

    return tmp_path, env, write


def test_refusals_before_anything_is_submitted(slurm: SlurmCluster, setup) -> None:
    root, env, write = setup
    jobs_before = slurm.squeue("%i", "--states=all")  # the session's cluster: other tests' jobs too
    p = armlab("launch", str(write(partition="gpu-a100")), env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "host 'cluster': partition = 'gpu-a100' is not a partition of this cluster (sinfo lists: cpu, gpu)" in p.stderr
    p = armlab("launch", str(write(extra='prepare_partition = "bigmem"')), env=env)
    assert p.returncode == 2 and "prepare_partition = 'bigmem' is not a partition" in p.stderr, p.stderr
    # walltimes: under Slurm's warning resolution, and shorter than one checkpoint interval of a
    # d26 on 8 GPUs (save_every = 5000 steps of 0.86 s at H100 peak x 40%: ~72 min)
    p = armlab("launch", str(write(extra='time = "1"')), env=env)
    assert p.returncode == 2 and "time = '1' (60 s) is too short" in p.stderr, p.stderr
    d26 = write(extra='time = "20"').read_text().replace("depth = 1\n", "depth = 26\n").replace(
        'device = "cpu"\nnproc = 1', 'device = "cuda"\ngpus_per_node = 8').replace("save_every = 4", "save_every = 5000")
    (root / "d26.toml").write_text(d26.replace("total_batch_size = 64", "total_batch_size = 524288"))
    p = armlab("launch", str(root / "d26.toml"), env=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "time = '20' (1200 s) is shorter than one checkpoint interval (train.save_every = 5000 steps x 0.862 s a step" in p.stderr
    assert "estimated from the budget at H100 peak x MFU 40%" in p.stderr and "raise time, or lower train.save_every" in p.stderr
    # more ranks than the arm's shards can feed: refused once the data is there, before any job
    p = armlab("launch", str(write(nproc=32)), env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "host 'cluster': nodes_per_run (1) x nproc (32) = 32 ranks per run" in p.stderr and "row group" in p.stderr
    assert slurm.squeue("%i", "--states=all") == jobs_before  # nothing was submitted
    assert not (root / "wd" / "arms" / "rand" / "runs").exists()


def test_launch_status_stop_logs_compare(slurm: SlurmCluster, setup) -> None:
    root, env, write = setup
    exp = write()
    # a job holding the node's every CPU: launch's jobs stay PENDING until it ends
    go = root / "go"
    blocker = slurm.sbatch(f"-n{slurm.cpus_per_node}", "-o", "/dev/null", "--wrap", f"while [ ! -e {go} ]; do sleep 0.2; done")
    slurm.wait_job(blocker, {"RUNNING"})
    p = armlab("launch", str(exp), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    first = rows(p)
    assert {r: first[r][3] for r in RUNS} == dict.fromkeys(RUNS, "started: job pending")
    ids = {r: s["job"]["job_id"] for r, s in status(env, exp).items()}
    queued = {r[0]: r for r in slurm.squeue("%i|%T|%r|%j", "-j", ",".join(ids.values()))}
    assert {queued[ids[r]][1] for r in RUNS} == {"PENDING"}
    assert queued[ids["rand-s0"]][3] == "armlab-rand-s0"
    st = status(env, exp)  # the scheduler's view joined with the runs: queued, their job pending, why
    assert {(st[r]["state"], st[r]["job"]["state"]) for r in RUNS} == {("queued", "PENDING")}
    assert {st[r]["job"]["reason"] for r in RUNS} <= {"Resources", "Priority"}

    # a rerun submits nothing new: every run's job is pending
    p = armlab("launch", str(exp), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert {r: rows(p)[r][3] for r in RUNS} == dict.fromkeys(RUNS, "already submitted: job pending")
    assert {r: s["job"]["job_id"] for r, s in status(env, exp).items()} == ids

    # the node frees: two runs at a time; status shows a running job with its node
    go.touch()
    job_ids = ",".join(ids.values())
    until("a running job", lambda: any(r[1] == "RUNNING" for r in slurm.squeue("%i|%T", "-j", job_ids)))
    running = [s for s in status(env, exp).values() if s["job"]["state"] in ("RUNNING", "COMPLETED")]
    assert running and running[0]["job"]["nodes"] == "n1" and running[0]["job"]["link"] == 1

    # stop top: its running job stops (SIGTERM to the trainer) and ends, its pending one is cancelled
    p = armlab("stop", str(exp), "--arm", "top", "--timeout", "60", env=env)
    assert p.returncode == 0, p.stderr
    stopped = {ln.split("\t")[2]: ln.split("\t")[4] for ln in p.stdout.strip().splitlines()}
    assert set(stopped) <= {"top-s0", "top-s1"} and stopped, p.stdout
    for run, result in stopped.items():
        assert result.startswith(("stopped (SIGTERM)", "cancelled (pending)")) and f"job {ids[run]}" in result
        if result.startswith("stopped"):  # it checkpointed before its job ended, or says it had nothing to keep
            assert "; resumes from step " in result or "no checkpoint yet: a restart begins at step 0" in result
    ended = {r[0]: r[1] for r in slurm.squeue("%i|%T", "--states=all", "-j", f"{ids['top-s0']},{ids['top-s1']}")}
    assert not {ended[ids[r]] for r in ("top-s0", "top-s1")} & {"PENDING", "RUNNING", "COMPLETING"}

    # logs: the output of a run's job (the trainer's lines in it)
    logs = lambda: armlab("logs", str(exp), "--arm", "rand", "--run", "rand-s0", "-n", "50", env=env).stdout  # noqa: E731
    until("rand-s0's job to write a step", lambda: "step " in logs())

    # launch again: the stopped runs get new jobs (resuming), the others keep theirs; all finish
    p = armlab("launch", str(exp), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    again = rows(p)
    for run in ("top-s0", "top-s1"):
        assert again[run][3].startswith("started: job"), again[run]
    states = lambda: {r: json.loads((root / "wd/arms" / r.split("-")[0] / "runs" / r / "state.json").read_text())  # noqa: E731
                      .get("state") if (root / "wd/arms" / r.split("-")[0] / "runs" / r / "state.json").exists() else None
                      for r in RUNS}  # fmt: skip
    until("every run done", lambda: set(states().values()) == {"done"}, timeout=600)
    p = armlab("evaluate", str(exp), env=env)
    assert p.returncode == 0, p.stderr
    p = armlab("compare", str(exp), env=env)
    assert p.returncode == 0, p.stderr
    assert "top" in p.stdout + p.stderr and "rand" in p.stdout + p.stderr
    assert json.loads((root / "wd/report/summary.json").read_text())["comparisons"]


def chain_setup(root: Path, env: dict[str, str], steps: int, nproc: int = 1, extra: str = "") -> Path:
    make_pool(root / "pool", n_docs=1200, n_files=2)
    exp = root / "exp.toml"
    host = SLURM_HOST.format(partition="cpu", top="", nproc=nproc, extra=extra)
    exp.write_text(tiny_toml("slurm-chain", root / "wd", root / "pool", steps=steps, batch=128, hosts=host))
    p = armlab("launch", str(exp), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return exp


def reference(env: dict[str, str], exp: Path, name: str, *args: str) -> subprocess.Popen:
    """The same run, uninterrupted, on this machine (`armlab train`, no scheduler)."""
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "train", str(exp), "--arm", "rand",
           "--seed", "0", "--run-name", name, "--device", "cpu", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={k: v for k, v in env.items() if k != "ARMLAB_TEST_STEP_DELAY"})  # fmt: skip


def test_preemption_and_time_limit_chain_equal_an_uninterrupted_run(slurm: SlurmCluster, tmp_path: Path) -> None:
    """One run, a chain of three jobs or more: one is preempted (`scancel --signal=USR1` of the job
    running once the run is a few steps in: its trainer checkpoints, exits 130, the next job is
    submitted after it) and one meets its walltime (`time = "2"`: Slurm warns the batch step, which
    passes SIGUSR1 on, 30 to 60 s in); the last finishes. Its loss curve and final weights are
    those of the same run trained uninterrupted, bitwise. Which job gets which stop depends on
    when Slurm's time-limit tick comes; that both happen does not: after the preemption (a few
    steps in) the run still has over 120 s of steps, more than one job trains before its warning
    (at most 90 s: 2 min less 30 s), however slow a loaded machine makes its start."""
    steps = 240  # 0.6 s a step: 144 s in all
    env = {**slurm.env, "OMP_NUM_THREADS": "1", "ARMLAB_TEST_STEP_DELAY": "0.6"}
    exp = chain_setup(tmp_path, env, steps, extra='time = "2"')
    ref = reference(env, exp, "uninterrupted", "--num-iterations", str(steps))
    run = tmp_path / "wd/arms/rand/runs/rand-s0"
    jobs = tmp_path / "wd/arms/rand/runs/rand-s0.jobs"
    chain = lambda: json.loads((jobs / "chain.json").read_text())["links"]  # noqa: E731
    state = lambda: json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {}  # noqa: E731
    until("the run to train a few steps", lambda: state().get("state") == "running" and state().get("step", 0) >= 3)
    preempted = chain()[-1]["job_id"]
    slurm.run("scancel", "--signal=USR1", preempted)
    until("the run to finish", lambda: state().get("state") == "done", timeout=600)
    links = [x["job_id"] for x in chain()]
    outs = {j: (jobs / f"{j}.out").read_text() for j in links}
    assert len(links) >= 3 and links[-1] != preempted, outs
    assert "stopped resumably; link" in outs[preempted] and "time limit is near" not in outs[preempted]
    timed = [j for j in links if "the time limit is near (SIGUSR1)" in outs[j] and "stopped resumably" in outs[j]]
    assert timed, outs
    assert [x["after"] for x in chain()] == [None, *links[:-1]] and all(slurm.job(j)["Requeue"] == "0" for j in links)
    st = status(env, exp)["rand-s0"]
    assert st["state"] == "done" and st["job"]["link"] == len(links) and st["job"]["job_id"] == links[-1]
    assert ref.wait(600) == 0, ref.stdout.read()[-2000:]
    stops = [int(m) for j in links for m in re.findall(r"stopped at step (\d+) by", outs[j])]
    diff = same_run(run, tmp_path / "wd/arms/rand/runs/uninterrupted", steps)
    print(f"chain of {len(links)} jobs (stopped at steps {stops}) vs uninterrupted: max abs weight difference {diff}")
    assert diff == 0.0


def test_a_two_node_job_trains_as_one_node_of_two_ranks(slurm_2nodes: SlurmCluster, tmp_path: Path) -> None:
    """nodes_per_run = 2: one job, one `armlab train` per node under srun (a task each), 1 gloo rank
    each, meeting at node 0: the weights after the run equal a one-node two-rank run's bitwise."""
    steps = 4
    env = {**slurm_2nodes.env, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}  # gloo on loopback
    exp = chain_setup(tmp_path, env, steps, extra="nodes_per_run = 2")
    ref = reference(env, exp, "one-node", "--nproc", "2", "--num-iterations", str(steps))
    run = tmp_path / "wd/arms/rand/runs/rand-s0"
    until("the 2-node run to finish", lambda: (run / "state.json").exists()
          and json.loads((run / "state.json").read_text())["state"] in ("done", "failed"), timeout=300)  # fmt: skip
    (job,) = [x["job_id"] for x in json.loads((tmp_path / "wd/arms/rand/runs/rand-s0.jobs/chain.json").read_text())["links"]]
    rec = slurm_2nodes.wait_job(job)
    out = (tmp_path / f"wd/arms/rand/runs/rand-s0.jobs/{job}.out").read_text()
    assert (rec["JobState"], rec["NodeList"], rec["NumNodes"]) == ("COMPLETED", "n[1-2]", "2"), out
    assert json.loads((run / "run.json").read_text())["config"]["world_size"] == 2
    assert ref.wait(600) == 0, ref.stdout.read()[-2000:]
    diff = same_run(run, tmp_path / "wd/arms/rand/runs/one-node", steps)
    print(f"2 nodes x 1 rank (Slurm) vs 1 node x 2 ranks: max abs weight difference {diff}")
    assert diff == 0.0


def test_launch_until_decided_looks_once_per_launch_when_the_round_is_done(slurm: SlurmCluster, setup) -> None:
    """`launch --until-decided`: launch returns while its runs train, so each launch looks once,
    and only at a finished, evaluated round; the seeds it adds are launched like any other run."""
    root, env, write = setup
    exp = write()
    go = root / "go"  # every CPU held: the first round's jobs stay pending while launch looks again
    blocker = slurm.sbatch(f"-n{slurm.cpus_per_node}", "-o", "/dev/null", "--wrap", f"while [ ! -e {go} ]; do sleep 0.2; done")
    slurm.wait_job(blocker, {"RUNNING"})
    p = armlab("launch", str(exp), "--until-decided", "--max-seeds", "3", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "decide: nothing trained yet: this launch starts the first round" in p.stderr
    assert set(rows(p)) == set(RUNS)
    p = armlab("launch", str(exp), "--until-decided", "--max-seeds", "3", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "decide: the round is not finished (" in p.stderr and "rerun `armlab launch --until-decided`" in p.stderr
    assert not (root / "wd" / "seeds.json").exists() and set(rows(p)) == set(RUNS)  # nothing decided, nothing added
    go.touch()
    state = lambda r: root / "wd/arms" / r.split("-")[0] / "runs" / r / "state.json"  # noqa: E731
    until("the round done", lambda: all(state(r).exists() and json.loads(state(r).read_text())["state"] == "done"
                                        for r in RUNS), timeout=600)  # fmt: skip
    p = armlab("launch", str(exp), "--until-decided", "--max-seeds", "3", env=env)
    assert "decide: the round is not finished (" in p.stderr and "not done and evaluated" in p.stderr  # no eval.json yet
    assert armlab("evaluate", str(exp), env=env).returncode == 0
    # a launch refused after its look (an unknown --host) leaves seeds.json as it was
    p = armlab("launch", str(exp), "--until-decided", "--max-seeds", "3", "--host", "nosuch", env=env)
    assert p.returncode == 2 and "decide: top vs rand: " in p.stderr and "nosuch" in p.stderr.splitlines()[-1], p.stderr
    assert not (root / "wd" / "seeds.json").exists()
    p = armlab("launch", str(exp), "--until-decided", "--max-seeds", "3", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    seeds = json.loads((root / "wd" / "seeds.json").read_text())
    assert len(seeds["rounds"]) == 1 and "decide: top vs rand: " in p.stderr, p.stderr
    if "decide: adding seed 2 to rand, top" in p.stderr:  # within noise, and 3 seeds could tell
        assert all(rows(p)[r][3].startswith("started: job") for r in ("rand-s2", "top-s2")), p.stdout
        assert all(rows(p)[r][3] == "already done" for r in RUNS)
    else:  # decided, or 3 seeds could not tell: said, and nothing more is launched
        assert "decide: stop: " in p.stderr and set(rows(p)) == set(RUNS)
