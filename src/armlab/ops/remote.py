"""Run an experiment on SSH hosts: the SSH plumbing of `armlab launch` (armlab.ops.launch),
`logs`, `stop`, and remote `status`.

Each `[[hosts]]` entry trains every run (arm x seed) of the arms it lists, on its lanes
(armlab.ops.schedule). The experiment file is copied to the host with its workdir rewritten to
the host's and its `[[hosts]]` removed, so on the host it is a plain local experiment that the
host's own armlab (installed by `armlab setup`) prepares, trains and stops. Everything that reads
the host's files runs there as `agent()` (one SSH round trip, JSON out), so paths are expanded by
the host, not guessed here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from armlab.errors import ArmlabError
from armlab.ops.doctor import DoctorReport
from armlab.ops.lanes import MIRRORED_LANES
from armlab.ops.ssh import DEFAULT_REMOTE_PYTHON, Remote, rpath
from armlab.progress import console
from armlab.runs import (
    EVAL_JSON,
    METRICS_JSONL,
    RUN_JSON,
    STATE_JSON,
    TRAIN_LOG,
    is_live,
    read_state,
    stop_run,
)
from armlab.spec import Experiment, HostSpec, load_experiment
from armlab.workdir import (
    atomic_write_json,
    atomic_write_text,
    open_workdir,
    pid_alive,
    read_leases,
    release_lease,
)

METRICS_TAIL = 1000  # metrics.jsonl lines mirrored (plus every val_bpb line)
LOG_TAIL = 200  # train.log lines mirrored
STOP_TIMEOUT_S = 60  # the launcher itself gives its ranks 30 s after SIGTERM

T = TypeVar("T")


# -- where things live on a host ----------------------------------------------------------------------
def host_python(host: HostSpec) -> str:
    return host.python or DEFAULT_REMOTE_PYTHON


def host_workdir(exp: Experiment, host: HostSpec) -> str:
    """The workdir on the host, unexpanded (`~` is the host's home)."""
    return (host.workdir or exp.workdir or f"~/.cache/armlab/{exp.name}").rstrip("/")


def host_experiment_path(exp: Experiment, host: HostSpec) -> str:
    return host_workdir(exp, host) + "/experiment.toml"


def host_experiment_toml(exp: Experiment, host: HostSpec) -> str:
    """The experiment as the host sees it: its own workdir and nanochat checkout ([[hosts]] nanochat,
    `~` expanded there), no [[hosts]] (a plain local experiment)."""
    from armlab.workdir import to_toml

    nanochat = exp.nanochat.model_copy(update={"path": host.nanochat or exp.nanochat.path})
    local = exp.model_copy(update={"workdir": host_workdir(exp, host), "hosts": [], "nanochat": nanochat})
    return to_toml(local.model_dump(mode="json", exclude_none=True))


def push_experiment(exp: Experiment, host: HostSpec) -> str:
    path = host_experiment_path(exp, host)
    Remote.from_spec(host).put_text(host_experiment_toml(exp, host), path)
    return path


def armlab_cmd(host: HostSpec, *args: str, env: dict[str, str] | None = None) -> str:
    """Shell command running the host's armlab CLI with `args` (paths starting `~/` stay expandable)."""
    code = "import sys; sys.argv[0] = 'armlab'; from armlab.cli import main; main()"
    words = [rpath(a) if a.startswith("~/") else shlex.quote(a) for a in args]
    prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in (env or {}).items())
    return f"{prefix}{rpath(host_python(host))} -c {shlex.quote(code)} {' '.join(words)}"


def agent_cmd(host: HostSpec, op: str, exp_path: str, params: dict[str, Any]) -> str:
    code = "from armlab.ops.remote import agent; agent()"
    return f"{rpath(host_python(host))} -c {shlex.quote(code)} {op} {rpath(exp_path)} {shlex.quote(json.dumps(params))}"


def call_agent(
    exp: Experiment, host: HostSpec, op: str, params: dict[str, Any], timeout: float | None = 600
) -> Any:
    remote = Remote.from_spec(host)
    p = remote.run(
        agent_cmd(host, op, host_experiment_path(exp, host), params),
        check=False,
        timeout=timeout,
        what=f"armlab {op}",
    )
    out = p.stdout.decode(errors="replace").strip().splitlines()
    if p.returncode != 0 or not out:
        err = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln.strip()]
        tail = err[-1].strip() if err else f"exit status {p.returncode}"
        if (
            "No such file" in tail
            or "ModuleNotFoundError" in tail
            or "ImportError" in tail
            or p.returncode == 127
        ):
            raise ArmlabError(
                f"host {host.name!r}: armlab is not installed there ({tail}); run `armlab setup EXP --host {host.name}`"
            )
        raise ArmlabError(f"host {host.name!r}: armlab {op} failed: {tail}")
    return json.loads(out[-1])


def parallel(fn: Callable[[HostSpec], T], hosts: list[HostSpec]) -> list[T]:
    """fn on every host at once; the first error (in host order) is raised after all finish."""
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        futures = [pool.submit(fn, h) for h in hosts]
        results: list[Any] = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001  (kept, re-raised below once every host is done)
                results.append(e)
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


# -- refusals before anything starts --------------------------------------------------------------------
def _machine(host: HostSpec) -> tuple[str, int]:
    """(address, ssh port) a host entry connects to, so aliases of one machine compare equal."""
    name, port = Remote.from_spec(host).resolve()
    with contextlib.suppress(OSError):
        name = socket.getaddrinfo(name, port, proto=socket.IPPROTO_TCP)[0][4][0]
    return name, port


def select_hosts(
    exp: Experiment, names: list[str] | None = None, arms: list[str] | None = None
) -> list[HostSpec]:
    if not exp.hosts:
        raise ArmlabError(
            f"experiment {exp.name!r} has no [[hosts]]: add one (name, ssh, arms, num_gpus, gpus_per_run), "
            "or run on this machine with `armlab train`"
        )
    known = {h.name: h for h in exp.hosts}
    for n in names or []:
        if n not in known:
            raise ArmlabError(f"--host {n}: no such host in the experiment (hosts: {', '.join(known)})")
    for a in arms or []:
        exp.arm(a)
    return [
        h for h in exp.hosts
        if (not names or h.name in names) and (not arms or any(a in h.arms for a in arms))
    ]  # fmt: skip


def machine_labels(exp: Experiment) -> dict[str, str]:
    """Each entry's machine as `address:ssh-port` (aliases and IPs of one machine compare equal),
    for the schedule: entries of one machine share its GPUs and ports."""
    return {h.name: "{}:{}".format(*_machine(h)) for h in exp.hosts}


def shared_gpu_problems(exp: Experiment, reports: dict[str, DoctorReport]) -> list[str]:
    """Entries sharing a machine that together ask for more GPUs than it has."""
    by_machine: dict[tuple[str, int], list[HostSpec]] = {}
    for h in exp.hosts:
        if h.name in reports and h.device == "cuda":
            by_machine.setdefault(_machine(h), []).append(h)
    out = []
    for (addr, _), group in by_machine.items():
        have = reports[group[0].name].info["gpus"]
        need = sum(h.num_gpus for h in group)
        if len(group) > 1 and need > have:
            out.append(
                f"hosts {', '.join(h.name for h in group)} share {addr} and ask for {need} GPUs; it has {have}"
            )
    return out


# -- doctor on hosts ---------------------------------------------------------------------------------------
def world_args(host: HostSpec, device: str | None) -> list[str]:
    dev = device or host.device
    if dev == "cpu":
        return ["--device", "cpu", "--nproc", str(host.nproc)]
    return ["--device", "cuda", "--num-gpus", str(host.num_gpus)]


def remote_doctor(
    exp: Experiment,
    host: HostSpec,
    *,
    device: str | None = None,
    expect_data: bool = True,
    extra: tuple[str, ...] = (),
) -> DoctorReport:
    """`armlab doctor --json` on the host for its arm(s), plus: is its armlab this armlab?"""
    from armlab import __version__
    from armlab.ops.setup import source_fingerprint

    exp_path = push_experiment(exp, host)
    args = [
        "doctor",
        exp_path,
        "--local",
        "--json",
        *(["--master-port", str(host.master_port)] if host.master_port is not None else []),
        *world_args(host, device),
    ]
    for a in host.arms:
        args += ["--arm", a]
    if not expect_data:
        args.append("--no-expect-data")
    p = Remote.from_spec(host).run(
        armlab_cmd(host, *args, *extra), check=False, timeout=600, what="armlab doctor"
    )
    lines = [ln for ln in p.stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        err = [ln for ln in p.stderr.decode(errors="replace").splitlines() if ln.strip()]
        tail = err[-1].strip() if err else f"exit status {p.returncode}"
        raise ArmlabError(
            f"host {host.name!r}: cannot run armlab there ({tail}); run `armlab setup EXP --host {host.name}`"
        )
    rep = DoctorReport.from_json(lines[-1])
    rep.host = host.name
    info = rep.info
    if info.get("armlab") != __version__ or info.get("armlab_source") != source_fingerprint():
        rep.add(
            "armlab", "fail", f"host runs armlab {info.get('armlab')} (source {info.get('armlab_source')}), "
            f"this machine {__version__} (source {source_fingerprint()})", f"armlab setup EXP --host {host.name}",
        )  # fmt: skip
    else:
        rep.add("armlab", "ok", f"same armlab as this machine ({__version__}, source {source_fingerprint()})")
    return rep


def doctor_hosts(exp: Experiment, hosts: list[HostSpec], **kw: Any) -> list[DoctorReport]:
    reports = parallel(lambda h: remote_doctor(exp, h, **kw), hosts)
    by_name = {r.host: r for r in reports}
    for problem in shared_gpu_problems(exp, by_name):
        reports[0].add(
            "gpus (shared)", "fail", problem, "lower num_gpus on one of them or move an arm to another host"
        )
    return reports


# -- the host-side agent ------------------------------------------------------------------------------------
def run_dirs(exp: Experiment, arms: list[str]) -> list[Path]:
    wd = open_workdir(exp, create=False)
    return sorted(p.parent for a in arms for p in wd.runs_dir(a).glob(f"*/{STATE_JSON}"))


def run_state(run_dir: Path) -> dict[str, Any]:
    """state.json plus `alive`: the run is live here (False when it ran elsewhere)."""
    st = read_state(run_dir)
    if not st:
        return {"state": None, "alive": False}
    return {**st, "alive": is_live(st)}


def _tail_lines(path: Path, n: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size, block, data = f.tell(), 1 << 16, b""
            while size > 0 and data.count(b"\n") <= n:
                step = min(block, size)
                size -= step
                f.seek(size)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-n:]


def mirror_payload(exp: Experiment, arms: list[str], host: str | None = None) -> dict[str, Any]:
    """Small files of every run of these arms (run.json, state.json, tails of metrics and log),
    and the lanes of host entry `host` as this machine sees them (runner alive or not)."""
    from armlab.ops.lanes import read_lanes

    lanes = [v.to_json() for v in read_lanes(open_workdir(exp, create=False).root) if v.host == host]
    out = []
    for rd in run_dirs(exp, arms):
        files: dict[str, str] = {}
        for name in (RUN_JSON, STATE_JSON, EVAL_JSON):
            with contextlib.suppress(FileNotFoundError):
                files[name] = (rd / name).read_text()
        metrics = rd / METRICS_JSONL
        if metrics.exists():
            with open(metrics, errors="replace") as f:
                lines = [ln.rstrip("\n") for ln in f if ln.strip()]
            tail = lines[-METRICS_TAIL:]
            evals = [ln for ln in lines[:-METRICS_TAIL] if '"val_bpb"' in ln]
            files[METRICS_JSONL] = "\n".join(evals + tail) + "\n" if lines else ""
        log = _tail_lines(rd / TRAIN_LOG, LOG_TAIL)
        if log:
            files[TRAIN_LOG] = "\n".join(log) + "\n"
        out.append(
            {
                "arm": rd.parent.parent.name,
                "run": rd.name,
                "run_dir": str(rd),
                "files": files,
                "state": run_state(rd),
            }
        )
    return {"runs": out, "lanes": lanes}


def stop_local(exp: Experiment, arms: list[str], timeout: float = STOP_TIMEOUT_S) -> list[dict[str, Any]]:
    """Stop this machine's lanes and live runs of these arms: first every live lane holding one of
    their runs (armlab.ops.lanes.stop_lanes: the lane's run stops, its queued runs do not start),
    then any other live run (`armlab.runs.stop_run`: SIGTERM the supervisor, wait, SIGKILL after
    timeout).

    The supervisor handles SIGTERM itself (stops its ranks, releases the lease, writes state
    "stopped"); after a SIGKILL the state is marked here, and the leases the dead process held
    are released."""
    from armlab.ops.lanes import stop_lanes

    wd = open_workdir(exp, create=False)
    results = stop_lanes(wd, arms, timeout)
    handled = {(r["arm"], r["run"]) for r in results}
    for rd in run_dirs(exp, arms):
        arm, run = rd.parent.parent.name, rd.name
        if (arm, run) in handled:
            continue
        stopped = stop_run(rd, timeout)
        if stopped is not None:
            results.append({"arm": arm, "run": run, "pid": stopped.pid, "result": stopped.result})
    for r in results:
        if r["pid"] is None:
            continue
        for lease in read_leases(wd.data_dir(r["arm"])):  # a SIGKILLed holder could not release its own
            if lease.local and lease.pid == r["pid"] and not pid_alive(lease.pid):
                release_lease(wd.data_dir(r["arm"]), lease)
    return results


def log_path(exp: Experiment, arm: str, run: str | None) -> Path:
    wd = open_workdir(exp, create=False)
    if run is None:
        runs = sorted(wd.runs_dir(arm).glob(f"*/{TRAIN_LOG}"), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise ArmlabError(f"arm {arm!r} has no run with a train.log yet in {wd.runs_dir(arm)}")
        return runs[-1]
    path = wd.run_dir(arm, run) / TRAIN_LOG
    if not path.exists():
        raise ArmlabError(f"{path}: no such log (is the run name right? it is <arm>-s<seed>)")
    return path


def tail_log(path: Path, lines: int, follow: bool) -> None:
    """Replace this process with `tail` (Ctrl-C ends it cleanly, locally or over SSH)."""
    argv = ["tail", "-n", str(lines), *(["-F"] if follow else []), str(path)]
    sys.stdout.flush()
    os.execvp("tail", argv)


def agent() -> None:
    """Host side of remote ops: `python -c '...agent()' OP EXP_PATH JSON_PARAMS`, JSON on stdout."""
    op, exp_path, params = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    try:
        exp = load_experiment(exp_path)
        if op in ("lanes_probe", "lanes_start"):
            from armlab.ops.launch import host_probe, host_start
            from armlab.ops.schedule import Slot

            slots = [Slot.from_json(d) for d in params["slots"]]
            out: Any = host_probe(exp, slots) if op == "lanes_probe" else host_start(exp, slots)
        elif op == "mirror":
            out = mirror_payload(exp, params["arms"], params.get("host"))
        elif op == "stop":
            out = stop_local(exp, params["arms"], params.get("timeout", STOP_TIMEOUT_S))
        elif op == "logs":
            tail_log(log_path(exp, params["arm"], params.get("run")), params["lines"], params["follow"])
            return
        else:
            raise ArmlabError(f"unknown agent op {op!r}")
    except ArmlabError as e:
        print(f"armlab: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(out, default=str))


# -- status, logs, stop ---------------------------------------------------------------------------------
def mirror_remote_runs(exp: Experiment) -> list[Path]:
    """Copy each remote run's small files into <workdir>/remote/<host>/arms/<arm>/runs/<run>/,
    and the host's lanes into <workdir>/remote/<host>/lanes.json.

    An unreachable host is reported on the console and skipped, so `status` still shows the rest.
    """
    if not exp.hosts:
        return []
    wd = open_workdir(exp)  # the mirror is the local side's cache of the hosts; the spec is not frozen here

    def fetch(h: HostSpec) -> list[Path]:
        try:
            payload = call_agent(exp, h, "mirror", {"arms": h.arms, "host": h.name}, timeout=120)
        except ArmlabError as e:
            console.print(f"[yellow]status[/]: skipped {e}")
            return []
        atomic_write_json(wd.root / "remote" / h.name / MIRRORED_LANES, payload["lanes"])
        out = []
        for item in payload["runs"]:
            dest = wd.root / "remote" / h.name / "arms" / item["arm"] / "runs" / item["run"]
            for name, text in item["files"].items():
                atomic_write_text(dest / name, text)
            atomic_write_json(dest / "remote.json", {"host": h.name, "ssh": h.ssh, "run_dir": item["run_dir"],
                                                     "alive": item["state"].get("alive"), "mirrored": time.time()})  # fmt: skip
            out.append(dest)
        return out

    return [p for paths in parallel(fetch, list(exp.hosts)) for p in paths]


def host_of_arm(exp: Experiment, arm: str) -> HostSpec | None:
    exp.arm(arm)
    return next((h for h in exp.hosts if arm in h.arms), None)


def logs(
    exp: Experiment,
    arm: str,
    run: str | None = None,
    follow: bool = False,
    lines: int = 50,
    local: bool = False,
) -> int:
    """Print (and with `follow`, stream) an arm's train.log, from its host or this machine."""
    host = None if local else host_of_arm(exp, arm)
    if host is None:
        tail_log(log_path(exp, arm, run), lines, follow)
        return 0  # not reached: tail replaced this process
    params = {"arm": arm, "run": run, "lines": lines, "follow": follow}
    rc = Remote.from_spec(host).stream(agent_cmd(host, "logs", host_experiment_path(exp, host), params))
    if rc == 2:
        raise ArmlabError(f"host {host.name!r}: no log for arm {arm!r} (see the message above)")
    return rc


def stop(
    exp: Experiment, arms: list[str] | None = None, timeout: float = STOP_TIMEOUT_S, local: bool = False
) -> list[dict[str, Any]]:
    """Stop live runs of the arms (all by default) on their hosts, or on this machine with `local`."""
    names = arms or [a.name for a in exp.arms]
    for a in names:
        exp.arm(a)
    if local or not exp.hosts:
        return [{"host": socket.gethostname(), **r} for r in stop_local(exp, names, timeout)]
    hosts = select_hosts(exp, arms=names)

    def one(h: HostSpec) -> list[dict[str, Any]]:
        mine = [a for a in h.arms if a in names]
        return [
            {"host": h.name, **r}
            for r in call_agent(exp, h, "stop", {"arms": mine, "timeout": timeout}, timeout=timeout + 120)
        ]

    return [r for rs in parallel(one, hosts) for r in rs]
