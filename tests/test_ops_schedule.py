"""armlab.ops.schedule: where every arm x seed trains, for several host shapes, and the refusals.

`plan_schedule` is pure, so these run no process: they check the rule its docstring states.
"""

from __future__ import annotations

from typing import Any

import pytest

from armlab.errors import ArmlabError
from armlab.ops.schedule import Slot, group_lanes, local_host, plan_schedule
from armlab.spec import parse_experiment


def experiment(hosts: list[dict[str, Any]], seeds=(0, 1, 2), arms=("a", "b"), **train: Any):
    return parse_experiment({
        "name": "sched", "pool": {"uri": "/nonexistent"},
        "arms": [{"name": n, "kind": "random", "ratio": 0.5, "seed": i} for i, n in enumerate(arms)],
        "model": {"depth": 2, "max_seq_len": 64},
        # 4 x 64 x 6: one run splits it over 1, 2, 3 or 6 ranks, not 4
        "train": {"device_batch_size": 4, "total_batch_size": 1536, "num_iterations": 10,
                  "seeds": list(seeds), **train},
        "hosts": hosts,
    })  # fmt: skip


def host(name: str, arms: list[str], **kw: Any) -> dict[str, Any]:
    return {"name": name, "ssh": name, "arms": arms, **kw}


def lanes_of(slots: list[Slot]) -> dict[str, list[str]]:
    return {lane[0].lane_id: [s.run for s in lane] for lane in group_lanes(slots)}


def test_one_run_at_a_time_by_default_on_all_gpus() -> None:
    exp = experiment([host("g", ["a"], num_gpus=6)], arms=("a",))
    slots = plan_schedule(exp).slots
    assert lanes_of(list(slots)) == {"g:0": ["a-s0", "a-s1", "a-s2"]}
    assert {s.gpus for s in slots} == {(0, 1, 2, 3, 4, 5)} and {s.world_size for s in slots} == {6}
    assert [s.position for s in slots] == [0, 1, 2]
    assert {s.port for s in slots} == {None}  # torchrun binds a free port itself
    assert slots[0].cuda_visible_devices == "0,1,2,3,4,5"


def test_gpus_per_run_cuts_the_gpus_into_lanes_dealt_round_robin() -> None:
    exp = experiment([host("g", ["a"], num_gpus=6, gpus_per_run=3, master_port=29500)], arms=("a",))
    slots = list(plan_schedule(exp).slots)
    assert lanes_of(slots) == {"g:0": ["a-s0", "a-s2"], "g:1": ["a-s1"]}
    by_run = {s.run: s for s in slots}
    assert by_run["a-s0"].gpus == by_run["a-s2"].gpus == (0, 1, 2) and by_run["a-s1"].gpus == (3, 4, 5)
    assert (by_run["a-s0"].port, by_run["a-s1"].port, by_run["a-s2"].port) == (29500, 29501, 29500)
    assert by_run["a-s2"].position == 1


def test_several_arms_on_one_host_go_seed_major() -> None:
    # the d12 pilot's shape: both arms, three seeds, one GPU a run: all six at once, disjoint GPUs
    exp = experiment([host("node", ["a", "b"], num_gpus=8, gpus_per_run=1)])
    slots = list(plan_schedule(exp).slots)
    assert [(s.run, s.lane, s.gpus) for s in slots] == [
        ("a-s0", 0, (0,)), ("b-s0", 1, (1,)), ("a-s1", 2, (2,)),
        ("b-s1", 3, (3,)), ("a-s2", 4, (4,)), ("b-s2", 5, (5,)),
    ]  # fmt: skip
    # two lanes: each seed's pair of arms trains at the same time
    exp = experiment([host("node", ["a", "b"], num_gpus=2, gpus_per_run=1)])
    assert lanes_of(list(plan_schedule(exp).slots)) == {
        "node:0": ["a-s0", "a-s1", "a-s2"],
        "node:1": ["b-s0", "b-s1", "b-s2"],
    }


def test_entries_on_one_machine_share_its_gpus_and_ports() -> None:
    hosts = [
        host("x", ["a"], num_gpus=4, gpus_per_run=2, master_port=29500),
        host("y", ["b"], num_gpus=2, master_port=29502),
    ]
    same = {"x": "10.0.0.1:22", "y": "10.0.0.1:22"}
    slots = {s.run: s for s in plan_schedule(experiment(hosts), machines=same).slots}
    assert slots["a-s0"].gpus == (0, 1) and slots["a-s1"].gpus == (2, 3) and slots["b-s0"].gpus == (4, 5)
    assert {slots["a-s0"].port, slots["a-s1"].port, slots["b-s0"].port} == {29500, 29501, 29502}
    # x's second lane takes 29501: y on 29501 would clash with it
    hosts[1]["master_port"] = 29501
    with pytest.raises(ArmlabError, match=r"hosts 'x' and 'y' are the same machine \(10.0.0.1:22\) .* master_port "
                                          r"29501.*set master_port = 29502 on 'y', or leave master_port out"):
        plan_schedule(experiment(hosts), machines=same)
    # two machines: each counts its GPUs and ports from zero
    other = {"x": "10.0.0.1:22", "y": "10.0.0.2:22"}
    hosts[1]["master_port"] = 29500
    slots = {s.run: s for s in plan_schedule(experiment(hosts), machines=other).slots}
    assert slots["b-s0"].gpus == (0, 1) and slots["b-s0"].port == 29500


def test_cpu_lanes_split_the_machines_cores() -> None:
    hosts = [
        host("c1", ["a"], device="cpu", num_gpus=0, nproc=2, runs_at_once=2),
        host("c2", ["b"], device="cpu", num_gpus=0, nproc=3),
    ]
    same = {"c1": "m", "c2": "m"}
    slots = {s.run: s for s in plan_schedule(experiment(hosts), machines=same).slots}
    assert (slots["a-s0"].cpu_share, slots["a-s1"].cpu_share, slots["b-s0"].cpu_share) == ((0, 3), (1, 3), (2, 3))
    assert slots["a-s0"].world_size == 2 and slots["b-s0"].world_size == 3
    assert slots["a-s0"].gpus == () and slots["a-s0"].cuda_visible_devices is None
    assert lanes_of(list(slots.values()))["c1:0"] == ["a-s0", "a-s2"]
    # launch --device cpu turns GPU entries into one CPU lane each, nproc ranks a run
    exp = experiment([host("g", ["a", "b"], num_gpus=8, gpus_per_run=2, nproc=2)])
    slots2 = plan_schedule(exp, device="cpu").slots
    assert {(s.device, s.lane, s.world_size) for s in slots2} == {("cpu", 0, 2)}


def test_a_subset_keeps_every_run_where_the_full_schedule_puts_it() -> None:
    exp = experiment([host("g", ["a", "b"], num_gpus=4, gpus_per_run=2, master_port=29600)])
    full = plan_schedule(exp)
    assert full.select(seeds=[1]) == [s for s in full.slots if s.seed == 1]
    assert {s.port for s in full.select(seeds=[1])} == {29600, 29601}
    # a seed added later lands behind the existing runs; none of them moves
    grown = plan_schedule(experiment([host("g", ["a", "b"], num_gpus=4, gpus_per_run=2, master_port=29600)],
                                     seeds=(0, 1, 2, 3)))  # fmt: skip
    assert grown.slots[: len(full.slots)] == full.slots


def test_arms_without_a_host_are_named() -> None:
    sched = plan_schedule(experiment([host("g", ["a"], num_gpus=1)], arms=("a", "b", "c")))
    assert sched.unassigned == ("b", "c") and {s.arm for s in sched.slots} == {"a"}


@pytest.mark.parametrize(
    ("hosts", "message"),
    [
        ([host("g", ["a"], num_gpus=4, gpus_per_run=8)], r"host 'g': gpus_per_run = 8 but num_gpus = 4; lower"),
        ([host("g", ["a"], num_gpus=8, gpus_per_run=3)],
         r"num_gpus = 8 is not a multiple of gpus_per_run = 3 \(2 GPU\(s\) would sit idle\); use gpus_per_run in "
         r"\[1, 2, 4, 8\], or lower num_gpus to 6"),
        ([host("g", ["a"], num_gpus=8, gpus_per_run=4)],
         r"host 'g' runs 4 rank\(s\) per run \(gpus_per_run\): train.total_batch_size = 1536 is not divisible"),
        ([host("c", ["a"], device="cpu", nproc=4)], r"host 'c' runs 4 rank\(s\) per run \(nproc\)"),
        ([host("g", ["a"]), host("h", ["a"])], r"arm 'a' is assigned to two hosts \('g' and 'h'\)"),
        ([host("c", ["a"], device="cpu", gpus_per_run=2)], r"host 'c': gpus_per_run is for device cuda"),
        ([host("g", ["a"], runs_at_once=2)], r"host 'g': runs_at_once is for device cpu; on GPUs set gpus_per_run"),
        ([host("g", ["a"], num_gpus=0)], r"host 'g': device cuda with num_gpus = 0"),
        ([host("g", ["a"], num_gpus=2, gpus_per_run=1, master_port=65535)], r"master_port 65535 \+ 2 lanes passes 65535"),
    ],
)  # fmt: skip
def test_refusals(hosts: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ArmlabError, match=message):
        plan_schedule(experiment(hosts))


def test_total_batch_splits_for_the_world_sizes_that_divide_it() -> None:
    plan_schedule(experiment([host("g", ["a"], num_gpus=6, gpus_per_run=3)]))  # 1536 = 4 x 64 x 3 x 2
    plan_schedule(experiment([host("g", ["a"], num_gpus=6, gpus_per_run=2)]))


def test_local_machine_as_one_host() -> None:
    exp = experiment([])
    h = local_host(exp, ["a", "b"], device="cuda", visible_gpus=8, gpus_per_run=2)
    assert (h.num_gpus, h.gpus_per_run) == (8, 2)  # four runs of two GPUs side by side
    assert len(group_lanes(list(plan_schedule(exp, [h]).slots))) == 4
    h = local_host(exp, ["a"], device="cuda", visible_gpus=8, gpus_per_run=3)
    assert (h.num_gpus, h.gpus_per_run) == (6, 3)  # what fits; the other two stay free
    h = local_host(exp, ["a"], device="cuda", visible_gpus=8, gpus_per_run=2, runs_at_once=1)
    assert (h.num_gpus, h.gpus_per_run) == (2, 2)
    assert local_host(exp, ["a"], device="cuda", visible_gpus=4).gpus_per_run == 4  # default: all, one at a time
    h = local_host(exp, ["a"], device="cpu", visible_gpus=0, nproc=2, runs_at_once=2)
    assert (h.device, h.nproc, h.runs_at_once) == ("cpu", 2, 2)
    with pytest.raises(ArmlabError, match=r"--runs-at-once 3 x --num-gpus 2 needs 6 GPUs but 4 are visible"):
        local_host(exp, ["a"], device="cuda", visible_gpus=4, gpus_per_run=2, runs_at_once=3)
    with pytest.raises(ArmlabError, match=r"--num-gpus 2 but 0 GPUs visible; use --device cpu"):
        local_host(exp, ["a"], device="cuda", visible_gpus=0, gpus_per_run=2)
    with pytest.raises(ArmlabError, match=r"--num-gpus is for CUDA"):
        local_host(exp, ["a"], device="cpu", visible_gpus=0, gpus_per_run=2)


def test_slots_round_trip_through_json() -> None:
    exp = experiment([host("c", ["a"], device="cpu", nproc=2, runs_at_once=2, master_port=29700)])
    for s in plan_schedule(exp).slots:
        assert Slot.from_json(s.to_json()) == s
