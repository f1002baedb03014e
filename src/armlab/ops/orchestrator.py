"""The orchestrator: every arm x seed of an experiment onto its hosts, written once for every
backend (armlab.ops.hosts). `armlab launch` (the `[[hosts]]`, detached) and `armlab run` (this
machine, attached) are the same steps over different hosts:

1. The schedule (armlab.ops.schedule) places every run on a lane of its host; each host refuses
   what its own settings cannot do (`Host.check`); nothing is touched yet.
2. Each host is probed in one round trip (`Host.probe`): the state of every run of its slots,
   its lanes' runners (or its jobs), whether each arm's data is there, free master ports.
3. `launch`: `doctor` runs on every host with a lane to start; a failure anywhere refuses the
   whole launch with nothing started.
4. Per host, in parallel: the data steps (`Host.prepare`), then `Host.start`: each lane's queue is
   written (merged with the queue already there, so `--seed 1` never drops another seed's queued
   run) and a runner started for each lane without a live one (or, on Slurm, a job submitted for
   each run without a pending or running one).
5. One row and one record (`<workdir>/launch.json`) per run: started, queued, already running,
   already done, or failed at start.

A rerun is safe at any point: a live run is reported, never restarted; a done one is skipped; a
lane whose runner lives only gets its queue rewritten; missing, stopped and failed runs are
started, resuming from their last checkpoint. `status`, `stop` and `logs` go through the same
hosts (`mirror_hosts`, `stop`, `logs`).
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from armlab.errors import ArmlabError, Stopped
from armlab.names import check_name
from armlab.ops.doctor import DoctorReport
from armlab.ops.hosts import Host, get_host
from armlab.ops.hosts.messages import HostProbe, LaneStarted, StartResult
from armlab.ops.lanes import MIRRORED_LANES, LaneState, StopRow
from armlab.ops.schedule import Slot, group_lanes, plan_schedule
from armlab.progress import console
from armlab.records import Record
from armlab.runs import RunState, read_state
from armlab.seeds import planned_seeds
from armlab.spec import Experiment, HostSpec
from armlab.text import plural
from armlab.workdir import (
    atomic_write_json,
    atomic_write_text,
    freeze_spec,
    open_workdir,
    read_json,
    step_lock,
)

LAUNCH_RECORD = "launch.json"  # <workdir>/launch.json: where `armlab launch` started each run
MIRRORED_JOBS = "jobs.json"  # <workdir>/remote/<host>/jobs.json: the host's jobs as its scheduler saw them

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class LaunchRecord(Record):
    host: str
    ssh: str | None  # how the host is reached (None: this machine)
    arm: str
    seed: int
    run: str
    run_dir: str  # on the host
    pid: int | None  # the lane runner's (it supervises the run)
    action: str  # started | queued | already running | already done | failed: ...
    master_port: int | None  # None: torchrun binds a free port
    device: str
    world_size: int
    cuda_visible_devices: str | None  # the lane's GPUs, counted among those the host shows
    lane: str
    job: str | None = None  # the scheduler's job id (Slurm)

    @property
    def failed(self) -> bool:
        return self.action.startswith("failed")


@dataclass(frozen=True)
class LaunchFile(Record):
    """<workdir>/launch.json: every run ever launched, the latest record of each (host/run)."""

    experiment: str
    fingerprint: str
    updated: float
    runs: list[LaunchRecord]


def parallel(fn: Callable[[T], U], items: list[T]) -> list[U]:
    """fn on every item (host) at once; the first error (in order) is raised after all finish."""
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        futures = [pool.submit(fn, h) for h in items]
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


# -- which hosts ----------------------------------------------------------------------------------------
def select_hosts(exp: Experiment, names: list[str] | None = None, arms: list[str] | None = None) -> list[HostSpec]:
    if not exp.hosts:
        raise ArmlabError(
            f"experiment {exp.name!r} has no [[hosts]]: add one (name, ssh, arms, num_gpus, gpus_per_run), "
            "or run on this machine with `armlab run`"
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


def hosts_of(exp: Experiment, names: list[str] | None = None, arms: list[str] | None = None) -> list[Host]:
    return [get_host(exp, spec) for spec in select_hosts(exp, names, arms)]


def machine_labels(hosts: list[Host]) -> dict[str, str]:
    return dict(zip([h.name for h in hosts], parallel(lambda h: h.machine(), hosts), strict=True))


def shared_gpu_problems(hosts: list[Host], machines: dict[str, str], reports: dict[str, DoctorReport]) -> list[str]:
    """Entries sharing a machine that together ask for more GPUs than it has."""
    by_machine: dict[str, list[HostSpec]] = {}
    for h in hosts:
        if h.name in reports and h.spec.device == "cuda":
            by_machine.setdefault(machines[h.name], []).append(h.spec)
    out = []
    for machine, group in by_machine.items():
        have = reports[group[0].name].info["gpus"]
        need = sum(h.num_gpus for h in group)
        if len(group) > 1 and need > have:
            addr = machine.rsplit(":", 1)[0]
            out.append(f"hosts {', '.join(h.name for h in group)} share {addr} and ask for {need} GPUs; it has {have}")
    return out


def doctor_hosts(exp: Experiment, hosts: list[Host], **kw: Any) -> list[DoctorReport]:
    """`doctor` on each host at once, plus what only the set of them shows (GPUs asked twice)."""
    reports = parallel(lambda h: h.doctor(**kw), hosts)
    by_name = {r.host: r for r in reports}
    for problem in shared_gpu_problems(hosts, machine_labels(hosts), by_name):
        reports[0].add("gpus (shared)", "fail", problem, "lower num_gpus on one of them or move an arm to another host")
    return reports


# -- launch -------------------------------------------------------------------------------------------
def _check_seeds(exp: Experiment, seeds: list[int] | None, flag: str) -> None:
    planned = planned_seeds(exp)  # train.seeds and the seeds `run --until-decided` added
    unknown = sorted(set(seeds or []) - {s for v in planned.values() for s in v})
    if unknown:
        raise ArmlabError(
            f"{flag} {','.join(map(str, unknown))}: not in train.seeds {exp.train.seeds}; add it there first"
        )


def launch(
    exp: Experiment,
    *,
    prepare_mode: str = "prepare",
    device: str | None = None,
    seeds: list[int] | None = None,
    hosts: list[str] | None = None,
    extra_doctor: tuple[str, ...] = (),
) -> list[LaunchRecord]:
    """Preflight every host, then start each host's runs there, detached; see the module docstring."""
    if prepare_mode not in ("prepare", "skip"):
        raise ArmlabError(f"--prepare-mode {prepare_mode}: use prepare or skip")
    _check_seeds(exp, seeds, "--seed")
    everyone = hosts_of(exp)
    select_hosts(exp, hosts)  # unknown --host: one line naming the hosts
    machines = machine_labels(everyone)
    schedule = plan_schedule(exp, device=device, machines=machines, seeds=planned_seeds(exp))
    if schedule.unassigned and not hosts:
        console.print(
            f"[yellow]launch[/]: arm(s) {', '.join(schedule.unassigned)} are on no [[hosts]] entry and are not launched"
        )
    chosen = [h for h in everyone if not hosts or h.name in hosts]
    slots = {h.name: schedule.select(seeds=seeds, hosts=[h.name]) for h in chosen}
    chosen = [h for h in chosen if slots[h.name]]
    for h in chosen:
        h.check(slots[h.name])

    console.print(f"launch: checking {plural(len(chosen), 'host')}: {', '.join(h.name for h in chosen)}")
    probes = dict(zip([h.name for h in chosen], parallel(lambda h: h.probe(slots[h.name]), chosen), strict=True))
    todo = [h for h in chosen if any(_to_start(probes[h.name], s) for s in slots[h.name])]
    starting = [h for h in todo if _starts(probes[h.name], slots[h.name])]
    reports = doctor_hosts(exp, starting, device=device, expect_data=prepare_mode == "skip", extra=extra_doctor)
    _check_ports(reports, probes)
    if reports:
        from armlab.ops.doctor import render

        render(reports, stderr=True)
        failed = [rep.host for rep in reports if not rep.ok]
        if failed:
            raise ArmlabError(
                f"preflight failed on {', '.join(failed)}: nothing was started; fix the failures above and rerun"
            )
    started = dict(zip([h.name for h in todo], parallel(lambda h: _prepare_and_start(h, slots[h.name],
                                                                                  probes[h.name], prepare_mode),
                                                          todo), strict=True))  # fmt: skip
    records = [r for h in chosen for r in _records(h, slots[h.name], probes[h.name], started.get(h.name))]
    _save(exp, records)
    for r in records:
        where = f" on lane {r.lane}" if r.job is None else ""  # a scheduler's job has no lane
        console.print(f"{r.host}: {r.run}{where}: {r.action}" + (f", pid {r.pid}" if r.pid else "")
                      + (f", job {r.job}" if r.job else ""))  # fmt: skip
    latest = {h: p.tokenizer for h, p in probes.items()} | {h: s.tokenizer for h, s in started.items()}
    tokenizers = set(latest.values()) - {None}
    if len(tokenizers) > 1:
        console.print(
            f"[bold red]warning[/]: hosts trained different tokenizers ({', '.join(sorted(tokenizers))}); runs will not compare"
        )
    return records


def _to_start(probe: HostProbe, slot: Slot) -> bool:
    """The slot's run is still to train here and nothing will train it yet (no live runner, no
    pending or running job)."""
    return probe.runs[slot.run].pending and slot.run not in probe.jobs


def _starts(probe: HostProbe, slots: list[Slot]) -> bool:
    """Whether starting would start something on the host (a lane runner or a job)."""
    if probe.lanes:
        return any(lane.starts for lane in probe.lanes.values())
    return any(_to_start(probe, s) for s in slots)


def _pending_slots(slots: list[Slot], probe: HostProbe) -> list[Slot]:
    """The slots of every lane with a run still to start (a lane is queued whole)."""
    lanes = [lane for lane in group_lanes(slots) if any(_to_start(probe, s) for s in lane)]
    return [s for lane in lanes for s in lane]


def _prepare_and_start(h: Host, slots: list[Slot], probe: HostProbe, mode: str) -> StartResult:
    todo = _pending_slots(slots, probe)
    arms = sorted({s.arm for s in todo if _to_start(probe, s)})
    h.prepare(arms if mode == "prepare" else [a for a in arms if not probe.data.get(a)], mode)
    return h.start(todo)


def _check_ports(reports: list[DoctorReport], probes: dict[str, HostProbe]) -> None:
    """launch checks every lane's port itself (doctor probes one); a live lane's port is its own."""
    for rep in reports:
        rep.checks = [c for c in rep.checks if c.name != "master_port" and not c.name.startswith("lease ")]
        for lane, info in probes[rep.host].lanes.items():
            if info.port_busy:
                rep.add(
                    "master_port", "fail", f"lane {lane}: its master port is in use on the host (another torchrun?)",
                    "change master_port in [[hosts]] (its lanes use master_port + k), or leave it out: each run "
                    "then binds a free port",
                )  # fmt: skip


def _action(before: Any, lane: LaneStarted | None, failure: str | None, first: bool) -> str:
    """What launch did for one run: `first` = the first run of its lane still to train."""
    if before.state == RunState.DONE:
        return "already done"
    if before.alive:
        return "already running"
    if failure:
        return f"failed: {failure}"
    if lane is not None and lane.action == "failed":
        return f"failed: the lane runner did not start: {lane.error}"
    if lane is not None and lane.action == "started" and first:
        return "started"
    return "queued"


def _records(h: Host, slots: list[Slot], probe: HostProbe, start: StartResult | None) -> list[LaunchRecord]:
    out = []
    jobs = {**probe.jobs, **(start.jobs if start else {})}
    for lane in group_lanes(slots):
        lane_id = lane[0].lane_id
        info = (start.lanes if start else {}).get(lane_id)
        seen = probe.lanes.get(lane_id)
        if info is None and seen is not None and seen.alive:
            info = LaneStarted(lane_id, "running", seen.pid)
        pending = [s.run for s in lane if probe.runs[s.run].pending]
        for s in lane:
            before = probe.runs[s.run]
            job = jobs.get(s.run)
            if job is not None and not before.alive and before.state != RunState.DONE:
                action = "already submitted" if s.run in probe.jobs else "started"
                action = f"{action}: job {job.state.lower()}"
            else:
                action = _action(before, info, (info.failures if info else {}).get(s.run),
                                 bool(pending) and s.run == pending[0])  # fmt: skip
            pid = before.pid if action == "already running" else (info.pid if info else None)
            out.append(LaunchRecord(
                host=h.name, ssh=h.spec.target, arm=s.arm, seed=s.seed, run=s.run, run_dir=before.run_dir,
                pid=None if action == "already done" else pid, action=action, master_port=s.port, device=s.device,
                world_size=s.world_size, cuda_visible_devices=s.cuda_visible_devices, lane=s.lane_id,
                job=job.job_id if job else None,
            ))  # fmt: skip
    return out


def _save(exp: Experiment, records: list[LaunchRecord]) -> None:
    wd = open_workdir(exp)
    freeze_spec(wd, exp)  # the launched experiment: `armlab status WORKDIR` reads it
    path = wd.root / LAUNCH_RECORD
    previous = LaunchFile.from_json(read_json(path), str(path)).runs if path.exists() else []
    kept = {f"{r.host}/{r.run}": r for r in previous}
    kept.update({f"{r.host}/{r.run}": r for r in records})
    atomic_write_json(path, LaunchFile(exp.name, exp.fingerprint(), time.time(), list(kept.values())).to_json())


# -- run (this machine, attached) ----------------------------------------------------------------------------
def local_host(
    exp: Experiment,
    arms: list[str],
    device: str | None = None,
    num_gpus: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
) -> Host:
    """This machine as the one host of `armlab run`; refuses a layout that cannot work (--num-gpus
    on a CPU host, a batch the ranks cannot split) before anything is touched."""
    from armlab.ops.hosts.local import LocalHost, this_machine

    host = LocalHost(exp, this_machine(exp, arms, device, num_gpus, nproc, runs_at_once), attach=True)
    plan_schedule(exp, [host.spec])
    return host


def _here(exp: Experiment, arms: list[str]) -> Host:
    """This machine as a host to stop or read runs on (no layout to check: nothing starts)."""
    from armlab.ops.hosts.local import LocalHost
    from armlab.ops.schedule import local_host as local_spec

    return LocalHost(exp, local_spec(exp, arms, device="cpu", visible_gpus=0))


def run_here(
    exp: Experiment, host: Host, seeds: list[int], arms: list[str] | None = None
) -> tuple[list[Path], list[str]]:
    """`armlab run`'s training: prepare the arms and the tokenizer, then train every run of
    `seeds` not yet done on this machine's lanes, attached; returns (finished run dirs, failure
    messages). One `armlab run` per workdir at a time: a second one is refused, naming the first.
    A stop (Ctrl-C, SIGTERM) stops every lane and raises Stopped."""
    from armlab.ops.lane_runner import LaneStopped

    wd = open_workdir(exp)
    with step_lock(wd, "run", wait=False):
        slots = plan_schedule(exp, [host.spec], seeds=planned_seeds(exp)).select(seeds=seeds)
        slots = [s for s in slots if arms is None or s.arm in arms]  # `run --until-decided`: these arms
        host.prepare(sorted({s.arm for s in slots}), "prepare")
        if not slots:
            return [], []
        lanes = group_lanes(slots)
        console.print(
            f"run: {plural(len(slots), 'run')} on {plural(len(lanes), 'lane')} of "
            f"{plural(slots[0].world_size, slots[0].device + ' rank')}"
        )
        probe = host.probe(slots)
        for s in slots:
            if probe.runs[s.run].state == RunState.DONE:
                console.print(f"run: {s.run} already done")
        try:
            result = host.start(slots)
        except LaneStopped:
            raise Stopped("armlab run stopped; rerun it to resume the stopped runs") from None
    failures: list[str] = []
    for lane in result.lanes.values():
        if lane.action == LaneState.STOPPED:
            raise Stopped("armlab run stopped; rerun it to resume the stopped runs")
        failures += list(lane.failures.values())
        if lane.action in ("died", "running") and lane.error:
            failures.append(lane.error)
    done = [d for d in (wd.run_dir(s.arm, s.run) for s in slots) if read_state(d).get("state") == RunState.DONE]
    return done, failures


# -- status, stop, logs -------------------------------------------------------------------------------------
def mirror_hosts(exp: Experiment) -> list[Path]:
    """Each host's runs' small files into <workdir>/remote/<host>/arms/<arm>/runs/<run>/ (unless
    the host's workdir is this one), its lanes into remote/<host>/lanes.json and its jobs into
    remote/<host>/jobs.json; returns the mirrored run dirs. An unreachable host is reported on the
    console and skipped, so `status` still shows the rest."""
    if not exp.hosts:
        return []
    wd = open_workdir(exp)  # the mirror is this side's cache of the hosts; the spec is not frozen here

    def fetch(h: Host) -> list[Path]:
        try:
            payload = h.mirror()
        except ArmlabError as e:
            console.print(f"[yellow]status[/]: skipped {e}")
            return []
        base = wd.root / "remote" / h.name
        atomic_write_json(base / MIRRORED_LANES, [v.to_json() for v in payload.lanes])
        atomic_write_json(base / MIRRORED_JOBS, [j.to_json() for j in payload.jobs])
        if getattr(h, "local_workdir", None) == wd.root:
            return []  # the host's runs are this workdir's own
        out = []
        for item in payload.runs:
            # names from the host: checked like any other before they become paths here
            dest = base / "arms" / check_name(item.arm, "arm name") / "runs" / check_name(item.run, "run name")
            for name, text in item.files.items():
                atomic_write_text(dest / check_name(name, "mirrored file name"), text)
            atomic_write_json(dest / "remote.json", {"host": h.name, "ssh": h.spec.target, "run_dir": item.run_dir,
                                                     "alive": item.alive, "mirrored": time.time()})  # fmt: skip
            out.append(dest)
        return out

    return [p for paths in parallel(fetch, hosts_of(exp)) for p in paths]


def stop(
    exp: Experiment, arms: list[str] | None = None, timeout: float | None = None, local: bool = False
) -> list[StopRow]:
    """Stop live runs of the arms (all by default) on their hosts, or on this machine with `local`:
    each run checkpoints first (the trainer's stop; SIGKILL after `timeout`, default
    agent.stop_timeout()), and a stop says where a restart resumes, or that it begins at step 0."""
    from armlab.ops.hosts.agent import stop_timeout

    timeout = timeout or stop_timeout()
    names = arms or [a.name for a in exp.arms]
    for a in names:
        exp.arm(a)
    if local or not exp.hosts:
        host = _here(exp, names)
        return [dataclasses.replace(r, host=socket.gethostname()) for r in host.stop(names, timeout)]

    def one(h: Host) -> list[StopRow]:
        return h.stop([a for a in h.spec.arms if a in names], timeout)

    return [r for rows in parallel(one, hosts_of(exp, arms=names)) for r in rows]


def logs(exp: Experiment, arm: str, run: str | None = None, follow: bool = False, lines: int = 50,
         local: bool = False) -> int:  # fmt: skip
    """Print (and with `follow`, stream) a run's log, from its host or this machine."""
    exp.arm(arm)
    spec = None if local else next((h for h in exp.hosts if arm in h.arms), None)
    host = _here(exp, [arm]) if spec is None else get_host(exp, spec)
    return host.logs(arm, run, lines, follow)
