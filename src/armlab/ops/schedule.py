"""Which run trains where, and after which: every arm x seed placed on a lane of a host.

A *lane* is one set of GPUs (or, on a CPU host, one share of its cores) that trains its runs one
after another; a host's lanes train side by side. `plan_schedule` is the one place that decides:
`armlab run` (this machine, one host entry named "local") and `armlab launch` (the `[[hosts]]`)
both take their slots from it, and `armlab.ops.lanes` / `lane_runner` run them.

The rule:

1. An arm's runs all go to the one host entry that lists it (its data is prepared there once);
   an entry may list several arms.
2. A CUDA entry's GPUs are cut into lanes of `gpus_per_run` (default: all `num_gpus`, so one run
   at a time): lane k holds GPUs k*g .. k*g+g-1 of the entry's block. Entries that resolve to
   one machine get consecutive blocks in file order (entry 1: 0..7, entry 2: 8..11), so their
   runs never share a GPU. A CPU entry has `runs_at_once` lanes of `nproc` processes each; its
   lanes split the machine's cores evenly (`cpu_share`).
3. The entry's runs in seed-major order (seed s of every arm before seed s+1, so an experiment
   cut short still holds whole seeds to compare) are dealt round-robin over its lanes; a lane
   trains its runs in that order.
4. Lane k's master port is `master_port + k` when the entry sets master_port; without it every
   run's torchrun binds a free port itself (c10d port 0), and runs on one machine cannot clash.

The placement depends on the spec only, never on what has run, so a rerun (or `--seed` /
`--arms` picking a subset) puts every run on the lane it had.

Refused before anything starts (ArmlabError, one line naming the entry and the fix): an arm on
two entries, gpus_per_run on a CPU entry or runs_at_once > 1 on a CUDA one, a CUDA entry with no
GPUs, gpus_per_run > num_gpus, num_gpus not a multiple of gpus_per_run, a total batch the ranks
of one run cannot split (`budget.grad_accum_steps`), and two lanes of one machine on one port.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from armlab.budget import Budget
from armlab.errors import ArmlabError
from armlab.records import Record
from armlab.spec import Experiment, HostSpec

LOCAL = "local"  # the host entry `armlab run` schedules this machine as


@dataclass(frozen=True)
class Slot(Record):
    """One run and where it trains: host entry, lane, position in the lane, devices and port."""

    host: str
    lane: int  # the entry's lane: its runs train one after another
    position: int  # 0 = the lane's first run
    arm: str
    seed: int
    run: str
    device: str  # "cuda" | "cpu"
    world_size: int  # ranks of the run
    gpus: tuple[int, ...]  # CUDA device indices of the machine (empty on CPU)
    port: int | None  # master port; None: torchrun binds a free one
    cpu_share: tuple[int, int] | None = None  # CPU lanes: (this lane, lanes on the machine)
    nnodes: int = 1  # machines the run spans (world_size / nnodes ranks on each)
    rdzv: str | None = None  # HOST:PORT where a multi-node run's nodes meet (node 0's); None: one node

    @property
    def lane_id(self) -> str:
        return lane_id(self.host, self.lane)

    @property
    def cuda_visible_devices(self) -> str | None:
        return ",".join(map(str, self.gpus)) if self.gpus else None


def lane_id(host: str, lane: int) -> str:
    """How a lane is named to the user: `gpu-a:1`."""
    return f"{host}:{lane}"


def group_lanes(slots: Sequence[Slot]) -> list[list[Slot]]:
    """The slots by lane (lanes in first-seen order), each lane's in training order."""
    out: dict[str, list[Slot]] = {}
    for s in slots:
        out.setdefault(s.lane_id, []).append(s)
    return [sorted(lane, key=lambda s: s.position) for lane in out.values()]


@dataclass(frozen=True)
class Schedule:
    slots: tuple[Slot, ...]
    unassigned: tuple[str, ...]  # arms no host entry lists (not scheduled anywhere)

    def lanes(self) -> list[list[Slot]]:
        return group_lanes(self.slots)

    def select(self, seeds: Sequence[int] | None = None, hosts: Sequence[str] | None = None) -> list[Slot]:
        """The slots of these seeds / host entries (None: all), each keeping its lane and port."""
        return [
            s for s in self.slots
            if (seeds is None or s.seed in seeds) and (hosts is None or s.host in hosts)
        ]  # fmt: skip


def _device(host: HostSpec, override: str | None) -> str:
    return override or host.device


def _lane_count(host: HostSpec, device: str, runs: int) -> int:
    """Lanes of one entry, refusing layouts that cannot work. On Slurm every run is its own job:
    a lane each (the scheduler, not armlab, decides where and when it runs)."""
    if host.scheduler == "slurm":
        if device == "cuda" and host.ranks_per_node(device) < 1:
            raise ArmlabError(f'host {host.name!r}: device cuda with gpus_per_node = 0; set it, or device = "cpu"')
        return max(runs, 1)
    if device == "cpu":
        if host.gpus_per_run is not None and host.device == "cpu":
            raise ArmlabError(
                f"host {host.name!r}: gpus_per_run is for device cuda; a CPU host runs runs_at_once runs of "
                "nproc processes each"
            )
        return host.runs_at_once
    if host.runs_at_once > 1:
        raise ArmlabError(
            f"host {host.name!r}: runs_at_once is for device cpu; on GPUs set gpus_per_run "
            f"(num_gpus / gpus_per_run runs train at once)"
        )
    if host.num_gpus < 1:
        raise ArmlabError(
            f'host {host.name!r}: device cuda with num_gpus = 0; set num_gpus, or device = "cpu"'
        )
    per = host.gpus_per_run or host.num_gpus
    if per > host.num_gpus:
        raise ArmlabError(
            f"host {host.name!r}: gpus_per_run = {per} but num_gpus = {host.num_gpus}; "
            f"lower gpus_per_run to at most {host.num_gpus}"
        )
    if host.num_gpus % per:
        fits = [g for g in range(1, host.num_gpus + 1) if host.num_gpus % g == 0]
        raise ArmlabError(
            f"host {host.name!r}: num_gpus = {host.num_gpus} is not a multiple of gpus_per_run = {per} "
            f"({host.num_gpus % per} GPU(s) would sit idle); use gpus_per_run in {fits}, or lower num_gpus "
            f"to {host.num_gpus - host.num_gpus % per}"
        )
    return host.num_gpus // per


def _world(host: HostSpec, device: str) -> int:
    return host.ranks_per_node(device) * host.nodes_of_run


def check_batch(
    exp: Experiment, hosts: Sequence[HostSpec], device: str | None = None, budget: Budget | None = None
) -> None:
    """Every run's ranks must split the total batch evenly (refused here, not on the host later;
    `armlab plan` asks too, with the budget of the trained tokenizer's vocabulary)."""
    from armlab.budget import batch_phrase, grad_accum_steps
    from armlab.train.engines import get_engine

    budget = budget or get_engine(exp.train.engine).budget(exp, exp.tokenizer.vocab_size)
    what = batch_phrase(exp.train, budget.total_batch_size)
    for h in hosts:
        world = _world(h, _device(h, device))
        try:
            grad_accum_steps(
                budget.total_batch_size, exp.train.device_batch_size, exp.model.max_seq_len, world, what
            )
        except ArmlabError as e:
            knob = "nproc" if _device(h, device) == "cpu" else "gpus_per_run"
            raise ArmlabError(f"host {h.name!r} runs {world} rank(s) per run ({knob}): {e}") from None


def _owners(exp: Experiment, hosts: Sequence[HostSpec]) -> dict[str, HostSpec]:
    owner: dict[str, HostSpec] = {}
    for h in hosts:
        for a in h.arms:
            exp.arm(a)  # unknown arm: one line naming the arms
            if a in owner:
                raise ArmlabError(
                    f"arm {a!r} is assigned to two hosts ({owner[a].name!r} and {h.name!r}); keep it on one "
                    "(its seeds can train side by side there with gpus_per_run)"
                )
            owner[a] = h
    return owner


def plan_schedule(
    exp: Experiment,
    hosts: Sequence[HostSpec] | None = None,
    *,
    device: str | None = None,
    machines: Mapping[str, str] | None = None,
    seeds: Mapping[str, Sequence[int]] | None = None,
) -> Schedule:
    """Every arm x seed of `exp` placed on a lane of `hosts` (default: its `[[hosts]]`); see the
    module docstring for the rule and the refusals. `seeds` (arm -> seeds, default train.seeds
    for every arm) adds the seeds `run --until-decided` planned (`armlab.seeds.planned_seeds`):
    they come after train.seeds, so every run of train.seeds keeps its lane.

    `device` overrides every entry's device (`launch --device cpu`). `machines` maps an entry's
    name to the machine it reaches (entries with the same value share GPUs and ports; default:
    its `ssh` target and port, unresolved). Pure: no process, file or network is touched."""
    hosts = list(exp.hosts if hosts is None else hosts)
    machines = machines or {h.name: f"{h.target or 'localhost'}:{h.port or 22}" for h in hosts}
    owner = _owners(exp, hosts)
    planned = seeds or {}
    every = list(dict.fromkeys([*exp.train.seeds, *(x for v in planned.values() for x in v)]))
    orders = {
        h.name: [
            (arm.name, seed) for seed in every for arm in exp.arms
            if owner.get(arm.name) is h and seed in planned.get(arm.name, exp.train.seeds)
        ]
        for h in hosts
    }  # fmt: skip
    lanes = {h.name: _lane_count(h, _device(h, device), len(orders[h.name])) for h in hosts}
    check_batch(exp, hosts, device)

    # GPU blocks and CPU shares per machine, in file order (a scheduler's nodes are its own)
    by_machine: dict[str, list[HostSpec]] = collections.defaultdict(list)
    for h in hosts:
        if h.scheduler != "slurm":
            by_machine[machines[h.name]].append(h)
    gpu_offset: dict[str, int] = {}
    cpu_first: dict[
        str, tuple[int, int]
    ] = {}  # entry -> (its first CPU lane on the machine, CPU lanes there)
    for group in by_machine.values():
        offset = 0
        for h in (h for h in group if _device(h, device) == "cuda"):
            gpu_offset[h.name] = offset
            offset += h.num_gpus
        cpu = [h for h in group if _device(h, device) == "cpu"]
        total = sum(lanes[h.name] for h in cpu)
        first = 0
        for h in cpu:
            cpu_first[h.name] = (first, total)
            first += lanes[h.name]
    _check_ports(hosts, lanes, machines)

    slots: list[Slot] = []
    for h in hosts:
        dev, n = _device(h, device), lanes[h.name]
        per = h.gpus_per_run or h.num_gpus
        slurm = h.scheduler == "slurm"
        for i, (arm, seed) in enumerate(orders[h.name]):
            k = i % n
            gpus = (
                tuple(range(gpu_offset[h.name] + k * per, gpu_offset[h.name] + (k + 1) * per))
                if dev == "cuda" and not slurm
                else ()
            )
            share = (cpu_first[h.name][0] + k, cpu_first[h.name][1]) if dev == "cpu" and not slurm else None
            slots.append(
                Slot(
                    host=h.name,
                    lane=k,
                    position=i // n,
                    arm=arm,
                    seed=seed,
                    run=exp.run_name(arm, seed),
                    device=dev,
                    world_size=_world(h, dev),
                    gpus=gpus,
                    port=None if h.master_port is None else h.master_port + k,
                    cpu_share=share,
                    nnodes=h.nodes_of_run,
                    rdzv=_rdzv(h, machines[h.name], k),
                )  # fmt: skip
            )
    unassigned = tuple(a.name for a in exp.arms if a.name not in owner)
    return Schedule(tuple(slots), unassigned)


def _rdzv(h: HostSpec, machine: str, lane: int) -> str | None:
    """Node 0's address and lane k's port, where the nodes of a run over SSH meet (Slurm's jobs
    find theirs when they start)."""
    if h.scheduler != "ssh" or h.nodes_of_run == 1 or h.master_port is None:
        return None
    address = machine.rsplit(":", 1)[0].rpartition("@")[2]
    return f"{address}:{h.master_port + lane}"


def _check_ports(hosts: Sequence[HostSpec], lanes: Mapping[str, int], machines: Mapping[str, str]) -> None:
    """Two lanes of one machine on one master port: the second torchrun could not bind it."""
    used: dict[str, dict[int, str]] = collections.defaultdict(dict)  # machine -> port -> entry
    for h in hosts:
        if h.master_port is None:
            continue
        taken = used[machines[h.name]]
        for port in range(h.master_port, h.master_port + lanes[h.name]):
            if port >= 65536:
                raise ArmlabError(
                    f"host {h.name!r}: master_port {h.master_port} + {lanes[h.name]} lanes passes 65535; "
                    "pick a lower master_port"
                )
            if port in taken:
                free = max(taken) + 1
                raise ArmlabError(
                    f"hosts {taken[port]!r} and {h.name!r} are the same machine ({machines[h.name]}) and both "
                    f"give a run master_port {port}: the second torchrun could not bind it (the playbook's "
                    f"collision); set master_port = {free} on {h.name!r}, or leave master_port out so each run "
                    "binds a free port"
                )
            taken[port] = h.name


def local_host(
    exp: Experiment,
    arms: Sequence[str],
    *,
    device: str,
    visible_gpus: int,
    gpus_per_run: int | None = None,
    nproc: int | None = None,
    runs_at_once: int | None = None,
    master_port: int | None = None,
) -> HostSpec:
    """This machine as one host entry for `armlab run`: CUDA runs of `gpus_per_run` GPUs
    (`--num-gpus`, default all visible), as many side by side as fit (`--runs-at-once` caps
    them); CPU runs of `nproc` processes, `runs_at_once` (default 1) side by side."""
    if device == "cpu":
        if gpus_per_run is not None:
            raise ArmlabError("--num-gpus is for CUDA; for CPU ranks use --device cpu --nproc N")
        return HostSpec(
            name=LOCAL, ssh="localhost", arms=list(arms), device="cpu", num_gpus=0, nproc=nproc or 1,
            runs_at_once=runs_at_once or 1, master_port=master_port,
        )  # fmt: skip
    if nproc is not None and gpus_per_run is not None and nproc != gpus_per_run:
        raise ArmlabError(f"--num-gpus {gpus_per_run} and --nproc {nproc} disagree; give one of them")
    per = gpus_per_run or nproc or visible_gpus
    if per < 1 or per > visible_gpus:
        fix = f"use --num-gpus {visible_gpus}" if visible_gpus else "use --device cpu"
        raise ArmlabError(
            f"--num-gpus {per or 1} but {visible_gpus} GPU{'s' if visible_gpus != 1 else ''} visible; {fix}"
        )
    fit = visible_gpus // per
    lanes = runs_at_once or fit
    if lanes > fit:
        raise ArmlabError(
            f"--runs-at-once {lanes} x --num-gpus {per} needs {lanes * per} GPUs but {visible_gpus} are visible; "
            f"use --runs-at-once {fit} or fewer GPUs per run"
        )
    return HostSpec(
        name=LOCAL, ssh="localhost", arms=list(arms), device="cuda", num_gpus=lanes * per, gpus_per_run=per,
        master_port=master_port,
    )  # fmt: skip
