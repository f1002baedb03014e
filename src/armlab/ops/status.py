"""`armlab status`: one row per run, from the run dir alone (works on dirs copied from elsewhere).

States are `armlab.runs.RunState`: queued (an arm x seed of the experiment with no run dir yet),
starting, running, done, failed, diverged (its loss became NaN/inf), stopped, STALLED (the process lives, or cannot be checked, but
nothing was logged for `stall_after_s`: the playbook's "process exists but nothing advances"),
dead (state.json says running but its pid is gone from this host), unreadable. Liveness is only
checked for pids of this host; a run from another host shows `?`.

A running run whose ranks are not training shows what they do instead (state.json's `phase`,
written by the trainer: `eval` or `save`, at the step in the step column); a done run that
`armlab evaluate` is scoring shows `done+eval:2/3` (checkpoint 2 of its last 3; state.json's
`evaluating`, ignored once its evaluator's pid is gone), and a val bpb
measured at another step than the row's carries it (`3.9399@250`); `--json` has both fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from armlab.errors import ArmlabError
from armlab.runs import (
    ACTIVE,
    Evaluating,
    Phase,
    RunState,
    last_activity,
    load_run,
    observed_state,
    owner_alive,
)


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
    lane: str | None = None  # the lane that trains (or will train) it: `gpu-a:1`, `gpu-a:1 (stopped)`
    engine: str | None = None  # the engine build that trains it, described (EngineConfig.describe)
    phase: str | None = None  # what a live run's ranks do at `step` (state.json: train, eval, save)
    val_bpb_step: int | None = None  # the step `val_bpb` was measured at (eval.json's, else the last eval's)
    job: Any = None  # its scheduler job (Slurm), an armlab.ops.hosts.messages.JobView
    evaluating: str | None = None  # a done run `armlab evaluate` is scoring: checkpoint "2/3" (phase "eval")


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
    s.val_bpb_step = _val_bpb_step(rec, s.step)
    s.tok_per_s = last.get("tok_per_s")
    s.mfu = last.get("mfu")
    s.epoch = last.get("epoch")
    activity = last_activity(run_dir, st)
    s.last_log_age_s = None if activity is None else max(0.0, now - activity)
    s.alive = owner_alive(st)
    s.state = observed_state(st, activity, stall_after_s, now)
    if s.state in (*ACTIVE, RunState.STALLED) and st.get("phase"):
        s.phase = str(st["phase"])  # only while the ranks run: a finished run has no phase...
    elif s.state == RunState.DONE and st.get("phase") == Phase.EVAL and st.get("evaluating"):
        ev = Evaluating.from_json(st["evaluating"], str(run_dir / "state.json"))
        if owner_alive({"pid": ev.pid, "host": ev.host}) is not False:  # ...but `armlab evaluate`'s
            s.phase, s.evaluating = Phase.EVAL.value, f"{ev.index}/{ev.of}"
    eta_known = s.tok_per_s and s.step is not None and s.num_iterations and s.tokens
    if s.state in (*ACTIVE, RunState.STALLED) and eta_known:
        tokens_per_step = s.tokens / max(s.step, 1)
        s.eta_s = (s.num_iterations - s.step) * tokens_per_step / s.tok_per_s
    return s


def _val_bpb_step(rec: Any, step: int | None) -> int | None:
    """The step of the val bpb status shows: `armlab evaluate`'s (eval.json's step, else the
    run's last), else the step of the last in-training eval."""
    if rec.eval and rec.eval.get("val_bpb") is not None:
        return rec.eval.get("step", step)
    lines = rec.eval_lines
    return int(lines[-1]["step"]) if lines and lines[-1].get("step") is not None else None


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
    """Every run of the experiment: existing run dirs (plus mirrored ones), and queued arm x seeds,
    each with the lane that trains it (armlab.ops.lanes: this workdir's and those mirrored from
    the hosts). A queued run its lane refused before it started (no run dir) shows as failed."""
    from armlab.ops.lanes import lanes_by_run
    from armlab.seeds import planned_runs
    from armlab.workdir import open_workdir

    wd = open_workdir(exp, create=False)
    rows = collect_status(wd.all_run_dirs() + list(extra_dirs or []), stall_after_s)
    seen = {(r.arm, r.run) for r in rows}
    for arm, _, name in planned_runs(exp):  # train.seeds, seeds `run --until-decided` added, ladder rungs
        if (arm, name) not in seen:
            rows.append(RunStatus(arm=arm, run=name, dir=None, state=RunState.QUEUED))
    lanes = lanes_by_run(wd.root)
    jobs = jobs_by_run(wd.root)
    for r in rows:
        if (job := jobs.get((r.arm, r.run))) is not None:
            r.job = job
        lane = lanes.get((r.arm, r.run))
        if lane is None:
            continue
        r.lane = lane.label()
        if r.state == RunState.QUEUED and r.run in lane.failures:
            r.state, r.error = RunState.FAILED, lane.failures[r.run]
    order = {a.name: i for i, a in enumerate(exp.arms)}
    return sorted(rows, key=lambda r: (order.get(r.arm, len(order)), r.arm, r.run))


def jobs_by_run(root: Path) -> dict[tuple[str, str], Any]:
    """(arm, run) -> its job as the host's scheduler last saw it (`remote/<host>/jobs.json`, written
    by the mirror)."""
    import json

    from armlab.ops.hosts.messages import JobView

    out = {}
    for path in sorted(Path(root).glob("remote/*/jobs.json")):
        try:
            for j in json.loads(path.read_text()):
                view = JobView.from_json(j, str(path))
                out[(view.arm, view.run)] = view
        except (OSError, ValueError, ArmlabError):
            continue  # a torn mirror: status shows the runs without their jobs
    return out


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


# -- rendering -------------------------------------------------------------------------------------
# One row per run in three forms: a rich table on a terminal (the full table when it fits, else a
# narrow one that abbreviates and drops columns by priority, so it fits 80 columns), plain aligned
# text when stdout is not a terminal (no colour, no box, never wrapped), and JSON (`--json`).
def _age(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.0f}s"
    return f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.1f}h" if s < 172_800 else f"{s / 86400:.1f}d"


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _si(v: float | None, fmt: str = ",.0f") -> str:
    """1234567 -> 1.2M (the narrow layout's numbers); small values as `fmt`."""
    if v is None:
        return "-"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.1f}{unit}"
    return format(v, fmt)


def _step(r: RunStatus, compact: bool) -> str:
    return "-" if r.step is None else f"{r.step}/{r.num_iterations or '?'}"


def _state(r: RunStatus) -> str:
    """The state, or what a running run does now when that is not training (`eval`, `save`):
    with the step column it reads `eval  250/2205`; a done run being scored by `armlab evaluate`
    reads `done+eval:2/3` (one word, so the piped table stays awk-able)."""
    if r.state == RunState.RUNNING and r.phase and r.phase != "train":
        return r.phase
    if r.state == RunState.DONE and r.evaluating:
        return f"done+eval:{r.evaluating}"
    return str(r.state)


def _bpb(r: RunStatus) -> str:
    """val bpb, with the step it was measured at when that is not the row's step (`3.9399@250`)."""
    if r.val_bpb is None:
        return "-"
    at = f"@{r.val_bpb_step}" if r.val_bpb_step is not None and r.val_bpb_step != r.step else ""
    return f"{r.val_bpb:.4f}{at}"


def _alive(r: RunStatus) -> str:
    if r.state not in (*ACTIVE, RunState.STALLED, RunState.DEAD):
        return "-"
    return {True: "yes", False: "no", None: "?"}[r.alive]


STYLE = {
    "done": "green",
    "running": "cyan",
    "STALLED": "bold red",
    "dead": "bold red",
    "failed": "red",
    "diverged": "bold red",
    "queued": "dim",
    "starting": "yellow",
    "stopped": "yellow",
    "unreadable": "red",
}


@dataclass(frozen=True)
class Column:
    header: str
    short: str  # header in the narrow layout
    drop: float  # the narrow layout drops the highest first (0: never dropped)
    cell: Callable[[RunStatus, bool], str]  # (row, compact) -> text
    left: bool = False


COLUMNS = (
    Column("arm", "arm", 8, lambda r, c: r.arm, left=True),
    Column("run", "run", 0, lambda r, c: r.run, left=True),
    Column("state", "state", 0, lambda r, c: _state(r), left=True),
    Column("lane", "lane", 9, lambda r, c: r.lane or "-", left=True),
    Column("step", "step", 1, _step),
    Column("tokens", "tokens", 12, lambda r, c: _si(r.tokens) if c else _f(r.tokens, ",")),
    Column("loss", "loss", 4, lambda r, c: _f(r.train_loss, ".3f")),
    Column("val bpb", "bpb", 2, lambda r, c: _bpb(r)),
    Column("tok/s", "tok/s", 6, lambda r, c: _si(r.tok_per_s) if c else _f(r.tok_per_s, ",.0f")),
    Column("MFU", "MFU", 10, lambda r, c: _f(r.mfu, ".1f")),
    Column("ETA", "ETA", 3, lambda r, c: _age(r.eta_s)),
    Column("epoch", "epoch", 11, lambda r, c: _f(r.epoch, ".2f")),
    Column("last log", "log", 5, lambda r, c: _age(r.last_log_age_s)),
    Column("alive", "alive", 7, lambda r, c: _alive(r)),
    Column("job", "job", 3.5, lambda r, c: _job(r, c), left=True),  # only when a run has a job
)


def _job(r: RunStatus, compact: bool) -> str:
    """The scheduler's view of the run's job (compact: squeue's short codes)."""
    return "-" if r.job is None else r.job.short() if compact else r.job.describe()


def _columns(rows: list[RunStatus]) -> list[Column]:
    """Every column; the job column only when some run has a scheduler job."""
    return [c for c in COLUMNS if c.header != "job" or any(r.job for r in rows)]


def _table(rows: list[RunStatus], cols: list[Column], compact: bool, title: str) -> Table:
    from rich import box

    t = Table(title=title, box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD, pad_edge=not compact)
    for col in cols:
        t.add_column(col.short if compact else col.header, justify="left" if col.left else "right",
                     no_wrap=True, overflow="ellipsis")  # fmt: skip
    for r in rows:
        cells = {col.header: escape(col.cell(r, compact)) for col in cols}
        if r.state in STYLE:
            cells["state"] = f"[{STYLE[r.state]}]{escape(_state(r))}[/]"
        t.add_row(*cells.values())
    return t


def _width(table: Table) -> int:
    from rich.console import Console

    return Console(width=10_000).measure(table).maximum


def status_table(rows: list[RunStatus], title: str = "", width: int | None = None) -> Table:
    """The full table when it fits `width` (None: always), else the narrow layout: compact numbers,
    short headers, a light box, and columns dropped by priority (the arm first when every run's
    name already starts with it) until it fits; run and state always stay."""
    full = _table(rows, _columns(rows), False, title)
    if width is None or _width(full) <= width:
        return full
    arm_in_run = all(r.run.startswith(r.arm) for r in rows)
    cols = [c for c in _columns(rows) if not (c.header == "arm" and arm_in_run)]
    while True:
        t = _table(rows, cols, True, title)
        droppable = [c for c in cols if c.drop]
        if _width(t) <= width or not droppable:
            return t
        cols.remove(max(droppable, key=lambda c: c.drop))


def plain_table(rows: list[RunStatus]) -> str:
    """Every column, aligned with spaces, no colour or box: for pipes, logs and `grep`."""
    cols = _columns(rows)
    header = [c.header.replace(" ", "_") for c in cols]  # one word per column, for awk / cut
    grid = [header] + [[c.cell(r, False) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(cols))]
    out = []
    for line in grid:
        cells = [v.ljust(w) if c.left else v.rjust(w) for c, v, w in zip(cols, line, widths, strict=True)]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)


def status_records(rows: list[RunStatus]) -> list[dict[str, Any]]:
    """`status --json`: one object per run with every field of RunStatus (paths as strings,
    numbers unrounded, null where unknown)."""
    out = []
    for r in rows:
        d = asdict(r)
        d["dir"] = None if r.dir is None else str(r.dir)
        d["state"] = str(r.state)
        out.append(d)
    return out


def engine_lines(rows: list[RunStatus]) -> list[str]:
    """Under the table: which engine build trains which runs, where it says more than its name
    (a nanochat checkout: commit, path, python)."""
    by: dict[str, list[str]] = {}
    for r in rows:
        if r.engine and " " in r.engine:
            by.setdefault(r.engine, []).append(r.run)
    return [f"engine: {desc} ({', '.join(names)})" for desc, names in by.items()]


def gpu_table(gpus: list[dict[str, Any]]) -> Table:
    t = Table(title="GPUs (this host)")
    for col in ("gpu", "name", "util %", "memory"):
        t.add_column(col)
    for g in gpus:
        t.add_row(
            str(g["index"]), g["name"], str(g["util"]), f"{g['mem_used_gb']:.1f}/{g['mem_total_gb']:.1f} GiB"
        )
    return t


def gpu_lines(gpus: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"gpu {g['index']}  {g['name']}  util {g['util']}%  memory {g['mem_used_gb']:.1f}/{g['mem_total_gb']:.1f} GiB"
        for g in gpus
    )


def mirrored_runs(exp: Any) -> list[Path]:
    """Run dirs mirrored from the experiment's hosts (none without hosts)."""
    from armlab.ops.orchestrator import mirror_hosts

    return mirror_hosts(exp)


def show_status(
    exp: Any, stall_after_s: float = 600.0, watch: bool = False, interval: float = 5.0, as_json: bool = False
) -> None:
    """Print the runs to stdout: a table on a terminal (fitted to its width), plain lines when
    piped, or JSON; with `watch`, again every `interval` s until Ctrl-C."""
    import json

    from rich.console import Console, Group
    from rich.live import Live

    if not exp.workdir_path.exists():
        raise ArmlabError(
            f"{exp.workdir_path}: no such workdir: experiment {exp.name!r} has not been prepared or run here "
            "(check the experiment file's workdir, or start with `armlab run EXP`)"
        )

    def rows() -> list[RunStatus]:
        return experiment_status(exp, stall_after_s, extra_dirs=mirrored_runs(exp))

    if as_json:
        print(json.dumps(status_records(rows()), indent=2))
        return
    out = Console()  # the table is the command's output: stdout
    title = lambda: f"{exp.name} ({time.strftime('%H:%M:%S')})"  # noqa: E731
    if not out.is_terminal:  # piped or logged: plain lines, a block per refresh
        while True:
            gpus = gpu_status()
            rs = rows()
            lines = [title(), plain_table(rs), *engine_lines(rs), *([gpu_lines(gpus)] if gpus else [])]
            print("\n".join(lines), flush=True)
            if not watch:
                return
            time.sleep(interval)
            print()

    def render() -> Group:
        rs = rows()
        table = status_table(rs, title=title(), width=out.size.width)
        gpus = gpu_status()
        parts = [table, *map(escape, engine_lines(rs))]
        return Group(*parts, gpu_table(gpus)) if gpus else Group(*parts)

    if not watch:
        out.print(render())
        return
    with Live(render(), console=out, refresh_per_second=1) as live:
        while True:
            time.sleep(interval)
            live.update(render())
