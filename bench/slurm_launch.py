#!/usr/bin/env python
"""`armlab launch` of a 2-arm x 2-seed CPU experiment on a private Slurm cluster on this machine
(tests/slurm_util.py: munged, slurmctld and one slurmd on loopback), printed as a user sees it:
`armlab status` at 80 columns while the jobs are pending and while they run, `squeue` beside it,
then `armlab compare`'s verdict. The figures for issue 17's note; nothing here is asserted (the
test is tests/test_ops_hosts_slurm.py).

    python bench/slurm_launch.py [--steps 40] [--keep DIR]

Needs slurm-wlm and munge (scripts/test.sh installs them).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from data_util import make_pool  # noqa: E402
from hosts_util import tiny_toml  # noqa: E402
from slurm_util import slurm_cluster  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

HOST = """
[[hosts]]
name = "cluster"
scheduler = "slurm"
partition = "cpu"
arms = ["rand", "top"]
device = "cpu"
nproc = 1
cpus_per_task = 2  # the node's 4 CPUs hold two runs at a time
"""


def armlab(env: dict[str, str], *args: str, columns: int = 80) -> str:
    """The real CLI on a terminal of `columns` columns (script(1) gives it a pty)."""
    cli = " ".join(shlex.quote(a) for a in (sys.executable, "-c", "from armlab.cli import main; main()", *args))
    cmd = f"stty cols {columns} rows 50; {cli}"
    p = subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True, env=env)
    return ANSI.sub("", p.stdout.replace("\r\n", "\n"))  # the text of the screen, without its colours


def show(title: str, env: dict[str, str], exp: Path, cluster) -> None:
    print(f"\n=== {title}: armlab status (80 columns)")
    print(armlab(env, "status", str(exp)).rstrip())
    print("--- squeue")
    print(cluster.run("squeue", "-o", "%.8i %.16j %.9T %.12r %.6M %N").stdout.rstrip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--keep", type=Path, help="work here (kept) instead of a temp dir")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="armlab-slurm-"))
    root.mkdir(parents=True, exist_ok=True)
    make_pool(root / "pool", n_docs=1200, n_files=2)
    exp = root / "exp.toml"
    exp.write_text(tiny_toml("slurm-demo", root / "wd", root / "pool", top=True, steps=a.steps, batch=64,
                             seeds="[0, 1]", save_every=8, hosts=HOST))  # fmt: skip
    with slurm_cluster(root / "slurm") as cluster:
        env = {**cluster.env, "OMP_NUM_THREADS": "1", "ARMLAB_TEST_STEP_DELAY": "0.2"}
        go = root / "go"  # a job holding every CPU: launch's jobs wait behind it, as on a busy cluster
        cluster.sbatch(f"-n{cluster.cpus_per_node}", "-J", "someone-else", "-o", "/dev/null", "--wrap",
                       f"while [ ! -e {go} ]; do sleep 0.2; done")  # fmt: skip
        t0 = time.monotonic()
        print(f"$ armlab launch {exp}")
        print(armlab(env, "launch", str(exp), columns=120).rstrip())
        show("pending", env, exp, cluster)
        go.touch()
        while "RUNNING" not in cluster.run("squeue", "-h", "-n", "armlab-rand-s0,armlab-top-s0", "-o", "%T").stdout:
            time.sleep(0.5)
        time.sleep(8)  # a few steps in, for the table's step, loss and tok/s columns
        show("running", env, exp, cluster)
        runs = [root / "wd" / "arms" / r.split("-")[0] / "runs" / r / "state.json" for r in
                ("rand-s0", "rand-s1", "top-s0", "top-s1")]  # fmt: skip
        while not all(p.exists() and '"done"' in p.read_text() for p in runs):
            time.sleep(1)
        print(f"\nall four runs done {time.monotonic() - t0:.0f} s after launch")
        show("done", env, exp, cluster)
        env_plain = {k: v for k, v in env.items() if k != "ARMLAB_TEST_STEP_DELAY"}
        subprocess.run([sys.executable, "-c", "from armlab.cli import main; main()", "evaluate", str(exp)],
                       env=env_plain, check=True, capture_output=True)  # fmt: skip
        print(f"\n$ armlab compare {exp}")
        print(armlab(env_plain, "compare", str(exp), columns=100).rstrip())
    if not a.keep:
        print(f"\n(work dir {root}; removed by the OS's tmp cleaner)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
