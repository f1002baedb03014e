"""`armlab status`: one row per run, from the run dir alone (works on dirs copied from elsewhere).

States are `armlab.runs.RunState`: queued (an arm x seed of the experiment with no run dir yet),
starting, running, done, failed, stopped, STALLED (the process lives, or cannot be checked, but
nothing was logged for `stall_after_s`: the playbook's "process exists but nothing advances"),
dead (state.json says running but its pid is gone from this host), unreadable. Liveness is only
checked for pids of this host; a run from another host shows `?`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from armlab.errors import ArmlabError
from armlab.progress import console
from armlab.runs import ACTIVE, RunState, last_activity, load_run, observed_state, owner_alive


@dataclass
class RunStatus:
    arm: str
    run: str
    dir: Path | None
    state: str
    step: int | None = None
    num_iterations: int | None = None
    tokens: int | None = None
    train_loss: float | None = None
    val_bpb: float | None = None
    tok_per_s: float | None = None
    mfu: float | None = None
    eta_s: float | None = None
    epoch: float | None = None
    last_log_age_s: float | None = None
    alive: bool | None = None  # None: pid on another host (cannot tell)
    host: str | None = None
    error: str | None = None
    engine: str | None = None  # the engine build that trains it, described (EngineConfig.describe)


def engine_description(info: dict[str, Any]) -> str:
    """run.json's engine record as one line (an unknown or damaged record: its name)."""
    from armlab.train.engines import get_engine

    data = info.get("engine") or {"engine": "builtin"}
    try:
        return get_engine(str(data["engine"])).load_config(data).describe()
    except (ArmlabError, KeyError, TypeError):
        return str(data.get("engine"))


def run_status(run_dir: Path, stall_after_s: float, now: float | None = None) -> RunStatus:
    now = time.time() if now is None else now
    rec = load_run(run_dir)
    st = rec.state or {}
    s = RunStatus(
        arm=rec.arm,
        run=rec.run,
        dir=run_dir,
        state=rec.state_name,
        host=st.get("host"),
        error=st.get("error"),
        engine=engine_description(rec.info),
    )
    train = rec.train_lines
    last = train[-1] if train else {}
    s.step = st.get("step", last.get("step"))
    if last.get("step") is not None and (s.step is None or last["step"] > s.step):
        s.step = last["step"]
    s.num_iterations = st.get("num_iterations") or (rec.info.get("config") or {}).get("num_iterations")
    s.tokens = last.get("tokens")
    s.train_loss = last.get("train_loss")
    s.val_bpb = rec.final_val_bpb
    s.tok_per_s = last.get("tok_per_s")
    s.mfu = last.get("mfu")
    s.epoch = last.get("epoch")
    activity = last_activity(run_dir, st)
    s.last_log_age_s = None if activity is None else max(0.0, now - activity)
    s.alive = owner_alive(st)
    s.state = observed_state(st, activity, stall_after_s, now)
    eta_known = s.tok_per_s and s.step is not None and s.num_iterations and s.tokens
    if s.state in (*ACTIVE, RunState.STALLED) and eta_known:
        tokens_per_step = s.tokens / max(s.step, 1)
        s.eta_s = (s.num_iterations - s.step) * tokens_per_step / s.tok_per_s
    return s


def collect_status(run_dirs: list[Path], stall_after_s: float = 600.0) -> list[RunStatus]:
    """One RunStatus per run dir; a dir with a torn run.json or state.json is a row saying so."""
    now = time.time()
    rows = []
    for d in map(Path, run_dirs):
        try:
            rows.append(run_status(d, stall_after_s, now))
        except ArmlabError as e:
            rows.append(
                RunStatus(
                    arm=d.parent.parent.name, run=d.name, dir=d, state=RunState.UNREADABLE, error=str(e)
                )
            )
    return rows


def experiment_status(
    exp: Any, stall_after_s: float = 600.0, extra_dirs: list[Path] | None = None
) -> list[RunStatus]:
    """Every run of the experiment: existing run dirs (plus mirrored ones), and queued arm x seeds."""
    from armlab.workdir import open_workdir, run_name

    wd = open_workdir(exp, create=False)
    rows = collect_status(wd.all_run_dirs() + list(extra_dirs or []), stall_after_s)
    seen = {(r.arm, r.run) for r in rows}
    for arm in exp.arms:
        for seed in exp.train.seeds:
            name = run_name(arm.name, seed)
            if (arm.name, name) not in seen:
                rows.append(RunStatus(arm=arm.name, run=name, dir=None, state=RunState.QUEUED))
    order = {a.name: i for i, a in enumerate(exp.arms)}
    return sorted(rows, key=lambda r: (order.get(r.arm, len(order)), r.arm, r.run))


def gpu_status() -> list[dict[str, Any]]:
    """Utilisation and memory per GPU via NVML (nvidia-ml-py), [] without it or without GPUs."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                {
                    "index": i,
                    "name": str(pynvml.nvmlDeviceGetName(h)),
                    "util": util.gpu,
                    "mem_used_gb": mem.used / 2**30,
                    "mem_total_gb": mem.total / 2**30,
                }
            )
        return out
    finally:
        pynvml.nvmlShutdown()


def _age(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h"


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


STYLE = {
    "done": "green",
    "running": "cyan",
    "STALLED": "bold red",
    "dead": "bold red",
    "failed": "red",
    "queued": "dim",
    "starting": "yellow",
    "stopped": "yellow",
    "unreadable": "red",
}


def status_table(rows: list[RunStatus], title: str = "") -> Table:
    t = Table(title=title)
    for col in (
        "arm",
        "run",
        "state",
        "step",
        "tokens",
        "loss",
        "val bpb",
        "tok/s",
        "MFU",
        "ETA",
        "epoch",
        "last log",
        "alive",
    ):
        t.add_column(col, justify="left" if col in ("arm", "run", "state") else "right")
    for r in rows:
        step = "-" if r.step is None else f"{r.step}/{r.num_iterations or '?'}"
        alive = (
            "-"
            if r.state not in (*ACTIVE, RunState.STALLED, RunState.DEAD)
            else {True: "yes", False: "no", None: "?"}[r.alive]
        )
        state = f"[{STYLE.get(r.state, '')}]{r.state}[/]" if r.state in STYLE else r.state
        t.add_row(
            r.arm,
            r.run,
            state,
            step,
            _f(r.tokens, ","),
            _f(r.train_loss, ".3f"),
            _f(r.val_bpb, ".4f"),
            _f(r.tok_per_s, ",.0f"),
            _f(r.mfu, ".1f"),
            _age(r.eta_s),
            _f(r.epoch, ".2f"),
            _age(r.last_log_age_s),
            alive,
        )
    return t


def engine_lines(rows: list[RunStatus]) -> list[str]:
    """Under the table: which engine build trains which runs, where it says more than its name
    (a nanochat checkout: commit, path, python)."""
    by: dict[str, list[str]] = {}
    for r in rows:
        if r.engine and " " in r.engine:
            by.setdefault(r.engine, []).append(r.run)
    return [escape(f"engine: {desc} ({', '.join(names)})") for desc, names in by.items()]


def gpu_table(gpus: list[dict[str, Any]]) -> Table:
    t = Table(title="GPUs (this host)")
    for col in ("gpu", "name", "util %", "memory"):
        t.add_column(col)
    for g in gpus:
        t.add_row(
            str(g["index"]), g["name"], str(g["util"]), f"{g['mem_used_gb']:.1f}/{g['mem_total_gb']:.1f} GiB"
        )
    return t


def mirrored_runs(exp: Any) -> list[Path]:
    """Run dirs mirrored from the experiment's SSH hosts (none without hosts or without the remote module)."""
    if not exp.hosts:
        return []
    try:
        from armlab.ops.remote import mirror_remote_runs
    except ImportError:
        console.print(
            "status: hosts are configured but armlab.ops.remote is unavailable; showing local runs only"
        )
        return []
    return mirror_remote_runs(exp)


def show_status(exp: Any, stall_after_s: float = 600.0, watch: bool = False, interval: float = 5.0) -> None:
    """Print the status table (and GPUs) to stdout; with `watch`, refresh every `interval` s until Ctrl-C."""
    from rich.console import Console, Group
    from rich.live import Live

    def render() -> Group:
        rows = experiment_status(exp, stall_after_s, extra_dirs=mirrored_runs(exp))
        gpus = gpu_status()
        table = status_table(rows, title=f"{exp.name} ({time.strftime('%H:%M:%S')})")
        parts = [table, *engine_lines(rows)]
        return Group(*parts, gpu_table(gpus)) if gpus else Group(*parts)

    out = Console()  # the table is the command's output: stdout
    if not out.is_terminal:
        out = Console(width=160)  # piped or logged: do not squeeze the columns to 80
    if not watch:
        out.print(render())
        return
    with Live(render(), console=out, refresh_per_second=1) as live:
        while True:
            time.sleep(interval)
            live.update(render())
