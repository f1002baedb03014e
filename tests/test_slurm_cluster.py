"""The test Slurm cluster (tests/slurm_util.py) does what the Slurm backend relies on.

Each test asserts what Slurm did (job records, the jobs' own output), never when: waits are bounded
polls. The one slow test is the time-limit signal (~30 s): slurmctld checks time limits on a ~30 s
tick (sbatch(1) --signal: "the signal may be sent up to 60 seconds earlier than specified").
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from slurm_util import SlurmCluster, slurm_cluster

pytestmark = pytest.mark.e2e


def wait_file(path: Path, timeout: float = 60) -> str:
    """A file a job writes once it reached a point (its trap set, its step started): its text."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written within {timeout}s")
        time.sleep(0.1)
    return path.read_text()


def wait_reason(c: SlurmCluster, jobid: str, reason: str, timeout: float = 60) -> list[str]:
    """A pending job's squeue row (id|state|reason|nodes) once its reason is `reason`."""
    deadline = time.monotonic() + timeout
    while True:
        row = c.squeue("%i|%T|%r|%N", "-j", jobid)[0]
        if row[2] == reason:
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"job {jobid}: {row}, not pending for {reason} after {timeout}s")
        time.sleep(0.1)


def test_batch_jobs_end_with_their_output_and_records(slurm: SlurmCluster, tmp_path: Path):
    ok = slurm.sbatch("-o", str(tmp_path / "%j.out"), script="#!/bin/bash\necho hello from $SLURM_JOB_ID\n")
    bad = slurm.sbatch("-p", "gpu", "-o", str(tmp_path / "%j.out"), "--wrap", "echo failing; exit 3")
    rec = slurm.wait_job(ok)
    assert (tmp_path / f"{ok}.out").read_text() == f"hello from {ok}\n"
    assert (rec["JobState"], rec["ExitCode"], rec["Partition"]) == ("COMPLETED", "0:0", "cpu")
    assert rec["NodeList"] == rec["BatchHost"] == "n1"
    assert rec["StartTime"] <= rec["EndTime"]  # ISO times: string order is time order
    rec = slurm.wait_job(bad)
    assert (rec["JobState"], rec["Reason"], rec["ExitCode"], rec["Partition"]) == (
        "FAILED",
        "NonZeroExitCode",
        "3:0",
        "gpu",
    )
    # Ended jobs stay listed (MinJobAge): squeue --states=all, with the fields status needs.
    rows = {r[0]: r for r in slurm.squeue("%i|%T|%P|%N", "--states=all", "-j", f"{ok},{bad}")}
    assert rows == {ok: [ok, "COMPLETED", "cpu", "n1"], bad: [bad, "FAILED", "gpu", "n1"]}
    # A job the controller no longer knows (purged MinJobAge after its end; 300 s by default): exit 1.
    r = slurm.run("scontrol", "show", "job", "-o", "1", check=False)
    assert (r.returncode, r.stderr.strip()) == (1, "slurm_load_jobs error: Invalid job id specified")


def test_srun_in_a_job_starts_one_process_per_task(slurm: SlurmCluster, tmp_path: Path):
    job = slurm.sbatch(
        "-n2", "-o", str(tmp_path / "out"),
        script="#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'\n",
    )  # fmt: skip
    assert slurm.wait_job(job)["JobState"] == "COMPLETED"
    assert sorted((tmp_path / "out").read_text().splitlines()) == ["task 0 of 2", "task 1 of 2"]


def test_two_slurmd_on_one_machine_make_a_two_node_job(slurm_2nodes: SlurmCluster, tmp_path: Path):
    """Debian's build runs several slurmd on one host (`slurmd -N`, a Port per node): a --nodes=2 job
    spans both, as on a real cluster."""
    job = slurm_2nodes.sbatch(
        "--nodes=2", "--ntasks-per-node=2", "-o", str(tmp_path / "out"),
        script="#!/bin/bash\nscontrol show hostnames \"$SLURM_JOB_NODELIST\"\n"
        "srun bash -c 'echo task $SLURM_PROCID node $SLURM_NODEID $SLURMD_NODENAME'\n",
    )  # fmt: skip
    rec = slurm_2nodes.wait_job(job)
    assert (rec["JobState"], rec["NodeList"], rec["NumNodes"], rec["BatchHost"]) == (
        "COMPLETED",
        "n[1-2]",
        "2",
        "n1",
    )
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines[:2] == ["n1", "n2"]
    assert sorted(lines[2:]) == [
        "task 0 node 0 n1",
        "task 1 node 0 n1",
        "task 2 node 1 n2",
        "task 3 node 1 n2",
    ]


def test_scancel_signal_reaches_the_steps_and_batch_reaches_the_shell(slurm: SlurmCluster, tmp_path: Path):
    """`scancel --signal=USR1` signals the job's steps (srun's tasks), not the batch shell (scancel(1):
    "signals other than SIGKILL are not sent to the batch step"); `--batch` signals the shell only."""
    log, ready, shell_ready = tmp_path / "log", tmp_path / "ready", tmp_path / "shell_ready"
    job = slurm.sbatch(
        "-n1", "-o", str(tmp_path / "out"),
        script=f"""#!/bin/bash
trap 'echo "shell: USR1" >> {log}; exit 0' USR1
srun bash -c 'trap "echo step: USR1 >> {log}; exit 0" USR1; touch {ready}; while :; do sleep 0.2; done'
echo "shell: step ended" >> {log}
touch {shell_ready}
while :; do sleep 0.2; done
""",
    )  # fmt: skip
    wait_file(ready)
    slurm.run("scancel", "--signal=USR1", job)
    wait_file(shell_ready)
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    rec = slurm.wait_job(job)
    assert rec["JobState"] == "COMPLETED"
    assert log.read_text().splitlines() == ["step: USR1", "shell: step ended", "shell: USR1"]


def test_time_limit_signals_the_shell_with_B_and_the_steps_without(slurm: SlurmCluster, tmp_path: Path):
    """`--signal=B:USR1@50 --time=1` reaches the batch shell before the limit; `--signal=USR1@50`
    reaches the step's tasks, and not the shell (which does not trap it and would die of it). Both
    jobs trap, record and exit: they end COMPLETED, not TIMEOUT. ~30 s: one slurmctld time-limit tick."""
    shell_log, step_log = tmp_path / "shell", tmp_path / "step"
    shell_job = slurm.sbatch(
        "--time=1", "--signal=B:USR1@50", "-o", str(tmp_path / "shell.out"),
        script=f"#!/bin/bash\ntrap 'echo USR1 > {shell_log}; exit 0' USR1\nwhile :; do sleep 0.2; done\n",
    )  # fmt: skip
    step_job = slurm.sbatch(
        "--time=1", "--signal=USR1@50", "-o", str(tmp_path / "step.out"),
        script=f"#!/bin/bash\nsrun bash -c 'trap \"echo USR1 > {step_log}; exit 0\" USR1; while :; do sleep 0.2; done'\n"
        f"echo step ended >> {step_log}\n",
    )  # fmt: skip
    for job in (shell_job, step_job):
        assert slurm.wait_job(job, timeout=240)["JobState"] == "COMPLETED"
    assert shell_log.read_text() == "USR1\n"
    assert step_log.read_text() == "USR1\nstep ended\n"


def test_requeue_reruns_the_same_job_id_with_a_restart_count(slurm: SlurmCluster, tmp_path: Path):
    """A job requeues itself (`scontrol requeuehold $SLURM_JOB_ID`: held, so the test sees it PENDING
    without racing the restart); its batch shell gets SIGTERM at once (then SIGKILL after KillWait),
    so a requeue is a script's last act. `scontrol release` runs it again under the same id with
    SLURM_RESTART_COUNT=1; --open-mode=append keeps the first run's output."""
    out = tmp_path / "out"
    job = slurm.sbatch(
        "--requeue", "--open-mode=append", "-o", str(out),
        script="""#!/bin/bash
echo "run ${SLURM_RESTART_COUNT:-0} of job $SLURM_JOB_ID"
[ -n "${SLURM_RESTART_COUNT:-}" ] && exit 0
trap 'echo "shell: TERM"; exit 1' TERM
scontrol requeuehold "$SLURM_JOB_ID"
while :; do sleep 0.2; done
""",
    )  # fmt: skip
    # COMPLETING while the first run's processes are killed, then PENDING. squeue words the reason
    # with spaces, scontrol with underscores.
    wait_reason(slurm, job, "job requeued in held state")
    rec = slurm.wait_job(job, {"PENDING"})
    assert (rec["JobState"], rec["Reason"], rec["Restarts"]) == ("PENDING", "job_requeued_in_held_state", "1")
    slurm.run("scontrol", "release", job)
    rec = slurm.wait_job(job)
    assert (rec["JobState"], rec["Restarts"], rec["ExitCode"]) == ("COMPLETED", "1", "0:0")
    lines = (
        out.read_text().splitlines()
    )  # also slurmstepd's "CANCELLED ... DUE TO JOB REQUEUE", bash's "Terminated"
    assert (lines[0], lines[-1]) == (f"run 0 of job {job}", f"run 1 of job {job}") and "shell: TERM" in lines
    # --no-requeue: scontrol requeue is refused
    never = slurm.sbatch("--no-requeue", "-o", "/dev/null", "--wrap", "sleep 300")
    slurm.wait_job(never, {"RUNNING"})
    r = slurm.run("scontrol", "requeue", never, check=False)
    assert r.returncode != 0 and "Requested operation is presently disabled" in r.stderr
    slurm.run("scancel", never)
    assert slurm.wait_job(never)["JobState"] == "CANCELLED"


def test_pending_jobs_show_their_reason_and_dependencies_chain(slurm: SlurmCluster, tmp_path: Path):
    go = tmp_path / "go"
    full = slurm.sbatch(
        f"-n{slurm.cpus_per_node}", "-o", "/dev/null", "--wrap", f"while [ ! -e {go} ]; do sleep 0.2; done"
    )
    slurm.wait_job(full, {"RUNNING"})
    waiting = slurm.sbatch("-n1", "-o", "/dev/null", "--wrap", "true")
    held = slurm.sbatch("-n1", "--hold", "-o", "/dev/null", "--wrap", "true")
    after = slurm.sbatch("-n1", f"--dependency=afterany:{full}", "-o", "/dev/null", "--wrap", "true")
    assert wait_reason(slurm, waiting, "Resources")[1] == "PENDING"  # the node's CPUs are all taken
    assert wait_reason(slurm, held, "JobHeldUser")[1] == "PENDING"
    assert wait_reason(slurm, after, "Dependency")[1] == "PENDING"
    assert slurm.job(after)["Dependency"] == f"afterany:{full}(unfulfilled)"
    go.touch()
    for job in (full, waiting, after):
        assert slurm.wait_job(job)["JobState"] == "COMPLETED"
    assert slurm.job(after)["StartTime"] >= slurm.job(full)["EndTime"]
    assert slurm.job(held)["JobState"] == "PENDING"  # still held
    slurm.run("scontrol", "release", held)
    assert slurm.wait_job(held)["JobState"] == "COMPLETED"


def test_teardown_stops_its_own_daemons_and_jobs_only(slurm: SlurmCluster, tmp_path: Path):
    """A second cluster beside the session's: leaving it kills its daemons and the process its job
    detached from Slurm's tracking, and the session's cluster still answers."""
    with slurm_cluster(tmp_path / "other") as other:
        assert other.name != slurm.name and other.conf_path != slurm.conf_path
        pidfile = tmp_path / "stray.pid"
        job = other.sbatch("-o", "/dev/null", "--wrap", f"setsid sleep 600 & echo $! > {pidfile}; sleep 600")
        other.wait_job(job, {"RUNNING"})
        stray = int(wait_file(pidfile))
        daemons = [p.pid for p in other.procs.values()]
    for pid in [stray, *daemons]:
        assert not _alive(pid), pid
    assert "is UP" in slurm.run("scontrol", "ping").stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0  # a zombie is dead
