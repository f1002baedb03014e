"""`armlab launch`: every arm x seed of the experiment on its `[[hosts]]`, detached, rerun-safe.

1. The schedule (armlab.ops.schedule, each entry's machine resolved with `ssh -G`) refuses a
   layout that cannot work before any host is touched.
2. Each chosen host gets the experiment file and is probed in one round trip (`host_probe`):
   the state of every run of its slots, its lanes' runners, whether each arm's data is there, and
   whether the master port of every lane still to start is free.
3. `doctor` runs on every host with a lane to start; a failure anywhere refuses the whole launch
   with nothing started.
4. Per host, in parallel: prepare (or pull) the arms of the runs still to train and the tokenizer,
   then `host_start`: each lane's queue is written (merged with the queue already there, so
   `--seed 1` never drops another seed's queued run) and a detached runner is started for every
   lane without a live one (armlab.ops.lanes); it waits until each new runner trains its first
   run or refused it.
5. One row and one record (`<workdir>/launch.json`) per run: started (its lane trains it now),
   queued (behind another run of its lane), already running, already done, or failed at start.

A rerun is safe at any point: a live run is reported, never restarted; a done one is skipped; a
lane whose runner lives only gets its queue rewritten (seeds added to train.seeds are appended);
missing, stopped and failed runs are started, resuming from their last checkpoint.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

from armlab.errors import ArmlabError
from armlab.ops.doctor import DoctorReport
from armlab.ops.lanes import LaneFiles, lane_alive, read_lane_state, read_queue, start_lanes
from armlab.ops.remote import (
    armlab_cmd,
    call_agent,
    doctor_hosts,
    host_experiment_path,
    machine_labels,
    parallel,
    push_experiment,
    run_state,
    select_hosts,
)
from armlab.ops.schedule import Slot, group_lanes, plan_schedule
from armlab.ops.ssh import Remote
from armlab.progress import console
from armlab.runs import RunState
from armlab.seeds import planned_seeds
from armlab.spec import Experiment, HostSpec
from armlab.text import plural
from armlab.workdir import atomic_write_json, freeze_spec, open_workdir, read_json

LAUNCH_RECORD = "launch.json"  # <workdir>/launch.json: where `armlab launch` started each run


@dataclass
class LaunchRecord:
    host: str
    ssh: str
    arm: str
    seed: int
    run: str
    run_dir: str  # on the host
    pid: int | None  # the lane runner's (it supervises the run)
    action: str  # started | queued | already running | already done | done | failed: ...
    master_port: int | None  # None: torchrun binds a free port
    device: str
    world_size: int
    cuda_visible_devices: str | None  # the lane's GPUs, counted among those the host shows
    lane: str

    @property
    def failed(self) -> bool:
        return self.action.startswith("failed")


# -- the host side (agent ops) -------------------------------------------------------------------------
def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _runs(exp: Experiment, slots: list[Slot]) -> dict[str, dict[str, Any]]:
    wd = open_workdir(exp, create=False)
    return {
        s.run: {"run_dir": str(wd.run_dir(s.arm, s.run)), **run_state(wd.run_dir(s.arm, s.run))}
        for s in slots
    }


def _pending(state: dict[str, Any]) -> bool:
    return state.get("state") != RunState.DONE and not state.get("alive")


def host_probe(exp: Experiment, slots: list[Slot]) -> dict[str, Any]:
    """On the host: its slots' run states, its lanes' runners, data, tokenizer, busy ports."""
    wd = open_workdir(exp, create=False)
    runs = _runs(exp, slots)
    lanes: dict[str, dict[str, Any]] = {}
    for lane in group_lanes(slots):
        st = read_lane_state(LaneFiles.of(wd.root, lane[0]))
        alive = lane_alive(st)
        starts = not alive and any(_pending(runs[s.run]) for s in lane)
        port = lane[0].port
        lanes[lane[0].lane_id] = {
            "alive": alive, "pid": st.get("pid") if alive else None, "starts": starts,
            "port_busy": bool(starts and port is not None and _port_busy(port)),
        }  # fmt: skip
    tok = wd.tokenizer_dir / "manifest.json"
    return {
        "hostname": socket.gethostname(),
        "runs": runs,
        "lanes": lanes,
        "data": {a: (wd.data_dir(a) / "manifest.json").exists() for a in {s.arm for s in slots}},
        "tokenizer": read_json(tok).get("fingerprint") if tok.exists() else None,
    }


def _merged(files: LaneFiles, slots: list[Slot]) -> list[Slot]:
    """The lane's queue: these slots, plus those of its queue already there (another --seed)."""
    try:
        _, old = read_queue(files)
    except (FileNotFoundError, ArmlabError, KeyError, TypeError):
        old = []
    new = {s.run: s for s in slots}
    kept = [s for s in old if s.run not in new and (s.host, s.lane) == (slots[0].host, slots[0].lane)]
    return sorted([*kept, *slots], key=lambda s: s.position)


def host_start(exp: Experiment, slots: list[Slot]) -> dict[str, Any]:
    """On the host: queue every lane of `slots` and start the runners that are not alive."""
    wd = open_workdir(exp)
    lanes = [_merged(LaneFiles.of(wd.root, lane[0]), lane) for lane in group_lanes(slots)]
    starts = start_lanes(wd, exp, lanes, detach=True)
    freeze_spec(wd, exp)
    out = {}
    for lane, start in zip(lanes, starts, strict=True):
        st = read_lane_state(LaneFiles.of(wd.root, lane[0]))
        mine = st.get("pid") == start.pid  # the failures of this lane's runner (not of an older one)
        out[start.lane] = {**start.to_json(), "failures": (st.get("failures") or {}) if mine else {}}
    tok = wd.tokenizer_dir / "manifest.json"
    return {
        "lanes": out,
        "tokenizer": read_json(tok).get("fingerprint") if tok.exists() else None,
    }


# -- this machine's side ---------------------------------------------------------------------------------
def _action(before: dict[str, Any], lane: dict[str, Any], failure: str | None, first: bool) -> str:
    """What launch did for one run: `first` = the first run of its lane still to train."""
    if before.get("state") == RunState.DONE:
        return "already done"
    if before.get("alive"):
        return "already running"
    if failure:
        return f"failed: {failure}"
    if lane.get("action") == "failed":
        return f"failed: the lane runner did not start: {lane.get('error')}"
    if lane.get("action") == "started" and first:
        return "started"
    return "queued"


def _check_ports(reports: list[DoctorReport], probes: dict[str, dict[str, Any]]) -> None:
    """launch checks every lane's port itself (doctor probes one); a live lane's port is its own."""
    for rep in reports:
        rep.checks = [c for c in rep.checks if c.name != "master_port" and not c.name.startswith("lease ")]
        for lane, info in probes[rep.host]["lanes"].items():
            if info["port_busy"]:
                rep.add(
                    "master_port", "fail", f"lane {lane}: its master port is in use on the host (another torchrun?)",
                    "change master_port in [[hosts]] (its lanes use master_port + k), or leave it out: each run "
                    "then binds a free port",
                )  # fmt: skip


def launch(
    exp: Experiment,
    *,
    prepare_mode: str = "prepare",
    device: str | None = None,
    seeds: list[int] | None = None,
    hosts: list[str] | None = None,
    extra_doctor: tuple[str, ...] = (),
) -> list[LaunchRecord]:
    """Preflight every host, then start each host's lanes detached there; see the module docstring."""
    if prepare_mode not in ("prepare", "skip"):
        raise ArmlabError(f"--prepare-mode {prepare_mode}: use prepare or skip")
    planned = planned_seeds(exp)  # train.seeds and the seeds `run --until-decided` added
    unknown = sorted(set(seeds or []) - {s for v in planned.values() for s in v})
    if unknown:
        raise ArmlabError(
            f"--seed {','.join(map(str, unknown))}: not in train.seeds {exp.train.seeds}; add it there first"
        )
    chosen = select_hosts(exp, hosts)
    schedule = plan_schedule(exp, device=device, machines=machine_labels(exp), seeds=planned)
    if schedule.unassigned and not hosts:
        console.print(
            f"[yellow]launch[/]: arm(s) {', '.join(schedule.unassigned)} are on no [[hosts]] entry and are not launched"
        )
    slots = {h.name: schedule.select(seeds=seeds, hosts=[h.name]) for h in chosen}
    chosen = [h for h in chosen if slots[h.name]]

    def first_probe(h: HostSpec) -> dict[str, Any]:
        push_experiment(exp, h)
        return call_agent(exp, h, "lanes_probe", {"slots": [s.to_json() for s in slots[h.name]]})

    console.print(f"launch: checking {plural(len(chosen), 'host')}: {', '.join(h.name for h in chosen)}")
    probes = dict(zip([h.name for h in chosen], parallel(first_probe, chosen), strict=True))
    todo = [h for h in chosen if any(_pending(probes[h.name]["runs"][s.run]) for s in slots[h.name])]
    starting = [h for h in todo if any(lane["starts"] for lane in probes[h.name]["lanes"].values())]
    reports = doctor_hosts(
        exp, starting, device=device, expect_data=prepare_mode == "skip", extra=extra_doctor
    )
    _check_ports(reports, probes)
    if reports:
        from armlab.ops.doctor import render

        render(reports, stderr=True)
        failed = [rep.host for rep in reports if not rep.ok]
        if failed:
            raise ArmlabError(
                f"preflight failed on {', '.join(failed)}: nothing was started; fix the failures above and rerun"
            )

    started: dict[str, dict[str, Any]] = {}

    def start(h: HostSpec) -> None:
        remote, exp_path = Remote.from_spec(h), host_experiment_path(exp, h)
        arms = sorted({s.arm for s in slots[h.name] if _pending(probes[h.name]["runs"][s.run])})
        if prepare_mode == "prepare":
            console.print(f"{h.name}: preparing arm(s) {', '.join(arms)} and the tokenizer")
            remote.run(
                armlab_cmd(h, "prepare", exp_path, *(f"--arm={a}" for a in arms)), what="armlab prepare"
            )
            remote.run(armlab_cmd(h, "tokenizer", exp_path), what="armlab tokenizer")
        else:
            for a in arms:
                if not probes[h.name]["data"][a] and exp.arm(a).kind == "prebuilt":
                    console.print(f"{h.name}: pulling prebuilt arm {a}")
                    remote.run(armlab_cmd(h, "pull", exp_path, "--arm", a), what=f"armlab pull --arm {a}")
        pending = {lane[0].lane_id for lane in group_lanes(slots[h.name])
                   if any(_pending(probes[h.name]["runs"][s.run]) for s in lane)}  # fmt: skip
        todo_slots = [s.to_json() for s in slots[h.name] if s.lane_id in pending]
        started[h.name] = call_agent(exp, h, "lanes_start", {"slots": todo_slots}, timeout=900)

    parallel(start, todo)
    records = [r for h in chosen for r in _records(h, slots[h.name], probes[h.name], started.get(h.name))]
    _save(exp, records)
    for r in records:
        console.print(f"{r.host}: {r.run} on lane {r.lane}: {r.action}" + (f", pid {r.pid}" if r.pid else ""))
    latest = {
        **{h: p.get("tokenizer") for h, p in probes.items()},
        **{h: p.get("tokenizer") for h, p in started.items()},
    }
    tokenizers = set(latest.values()) - {None}
    if len(tokenizers) > 1:
        console.print(
            f"[bold red]warning[/]: hosts trained different tokenizers ({', '.join(sorted(tokenizers))}); runs will not compare"
        )
    return records


def _records(
    h: HostSpec, slots: list[Slot], probe: dict[str, Any], start: dict[str, Any] | None
) -> list[LaunchRecord]:
    out = []
    for lane in group_lanes(slots):
        info = (start or {}).get("lanes", {}).get(lane[0].lane_id) or {}
        if not info and probe["lanes"][lane[0].lane_id]["alive"]:
            info = {"action": "running", "pid": probe["lanes"][lane[0].lane_id]["pid"]}
        pending = [s.run for s in lane if _pending(probe["runs"][s.run])]
        for s in lane:
            before = probe["runs"][s.run]
            action = _action(
                before, info, info.get("failures", {}).get(s.run), bool(pending) and s.run == pending[0]
            )
            pid = before.get("pid") if action == "already running" else info.get("pid")
            out.append(LaunchRecord(
                host=h.name, ssh=h.ssh, arm=s.arm, seed=s.seed, run=s.run, run_dir=before["run_dir"],
                pid=None if action == "already done" else pid, action=action, master_port=s.port, device=s.device,
                world_size=s.world_size, cuda_visible_devices=s.cuda_visible_devices, lane=s.lane_id,
            ))  # fmt: skip
    return out


def _save(exp: Experiment, records: list[LaunchRecord]) -> None:
    """<workdir>/launch.json: every run ever launched, the latest record of each (host/run)."""
    wd = open_workdir(exp)
    freeze_spec(wd, exp)  # the launched experiment: `armlab status WORKDIR` reads it
    path = wd.root / LAUNCH_RECORD
    previous = read_json(path) if path.exists() else {}
    kept = {f"{r['host']}/{r['run']}": r for r in previous.get("runs", [])}
    kept.update({f"{r.host}/{r.run}": asdict(r) for r in records})
    atomic_write_json(path, {
        "experiment": exp.name, "fingerprint": exp.fingerprint(), "updated": time.time(),
        "runs": list(kept.values()),
    })  # fmt: skip
