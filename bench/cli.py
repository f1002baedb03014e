"""How long `armlab` takes to refuse bad input: each refusal in a fresh interpreter, as a user
runs it, with the wall time and whether torch was imported (it should not be: importing torch
costs ~2 s on a 2-core box, more under load).

    python bench/cli.py                    # over the demo's workdir (run `armlab demo` first)
    python bench/cli.py --workdir DIR      # any prepared workdir with arms top40 / random40 ...
    python bench/cli.py --repeat 5

Each line is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROBE = """
import sys
from armlab.cli import main
sys.argv = ["armlab", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    print(f"rc={e.code} torch={'torch' in sys.modules}", file=sys.stderr)
"""


def refusals(wd: str) -> list[list[str]]:
    return [
        ["--version"],
        ["train", wd, "--arm", "nosuch"],
        ["prepare", wd, "--arm", "nosuch"],
        ["prepare", wd, "--ratio", "0.3"],
        ["run", wd, "--arm", "nosuch"],
        ["evaluate", wd, "--arm", "nosuch"],
        ["compare", wd, "--exclude", "nosuch-s0"],
        ["plan", wd, "--mfu", "fast"],
        ["rm", wd, "--arm", "nosuch", "--run", "x"],
        ["launch", wd],
        ["status", wd, "--json"],
        ["export", wd, "--arm", "nosuch", "--to", "/tmp/x"],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(Path("~/.cache/armlab/armlab-demo").expanduser()))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    if not (Path(args.workdir) / "experiment.toml").is_file():
        sys.exit(f"{args.workdir}: no experiment.toml; run `armlab demo` first (or pass --workdir)")
    print(f"{'seconds':>8}  {'exit':>4}  torch  command")
    for argv in refusals(args.workdir):
        times, tail = [], ""
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        rc = tail.partition("rc=")[2].split()[0] if "rc=" in tail else "?"
        torch = "yes" if "torch=True" in tail else "no"
        print(f"{statistics.median(times):8.2f}  {rc:>4}  {torch:>5}  armlab {' '.join(argv)}")


if __name__ == "__main__":
    main()
