"""`armlab rm`: delete one run dir (a smoke test, a run trained with the wrong flags).

A live run is refused (`armlab.runs.is_live`), and so is an active run whose pid belongs to
another host (a dir copied from there: this host cannot tell whether it still runs) unless
`force`. The dir is first renamed out of `runs/` to a hidden name in the arm's dir (atomic: from
then on no reader sees it as a run, since readers glob `arms/*/runs/*/run.json`), then deleted;
a deletion cut short leaves only that hidden dir, which the next `rm` of the arm removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from armlab.errors import ArmlabError
from armlab.names import check_name
from armlab.runs import ACTIVE, is_live, owner_alive, read_state
from armlab.spec import Experiment
from armlab.text import did_you_mean
from armlab.workdir import open_workdir, pid_alive

DELETING = ".deleting-"  # prefix of a run dir being deleted


def remove_run(exp: Experiment, arm: str, run: str, force: bool = False) -> Path:
    """Delete `<workdir>/arms/<arm>/runs/<run>`; returns the path it had."""
    exp.arm(arm)  # an unknown arm: one line naming the arms
    wd = open_workdir(exp, create=False)
    runs_dir, arm_dir = wd.runs_dir(arm), wd.arm_dir(arm)
    check_name(run, "--run")
    run_dir = runs_dir / run
    if not run_dir.is_dir():
        have = sorted(p.parent.name for p in runs_dir.glob("*/run.json"))
        listing = f" (runs: {', '.join(have)})" if have else " (it has no runs)"
        raise ArmlabError(f"arm {arm!r} has no run {run!r}{did_you_mean(run, have)}{listing}")
    try:
        state = read_state(run_dir)
    except ArmlabError as e:  # a torn state.json: whether it runs is unknown
        if not force:
            raise ArmlabError(f"{e}; if the run is not running, rerun with --force to delete it") from None
        state = {}
    if is_live(state):
        raise ArmlabError(f"{run_dir}: run {run!r} is live (pid {state['pid']}); stop it first: `armlab stop EXP --arm {arm}`")
    if state.get("state") in ACTIVE and owner_alive(state) is None and not force:
        raise ArmlabError(
            f"{run_dir}: run {run!r} says {state['state']} on host {state.get('host')!r}, which this machine cannot "
            "check; stop it there, or rerun with --force if it is not running"
        )
    for stale in arm_dir.glob(f"{DELETING}*"):  # an earlier rm cut short (not one still deleting)
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    doomed = arm_dir / f"{DELETING}{run}-{os.getpid()}"
    run_dir.rename(doomed)
    shutil.rmtree(doomed)
    return run_dir
