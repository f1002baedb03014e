"""`armlab plan`: prices the runs from the spec, says what the seeds can detect from a pilot's noise,
and refuses a score column the pool does not have (one line, exit 2, nothing written)."""

from __future__ import annotations

import random
import re
import subprocess
from pathlib import Path

import pytest

from armlab.budget import training_budget
from armlab.cost import PEAK_FLOPS, costs, parse_mfu
from armlab.errors import ArmlabError
from armlab.report.power import pilot_spreads
from armlab.report.stats import detectable, seeds_needed
from armlab.spec import load_experiment
from data_util import experiment_toml, make_pool
from results_util import make_run, tiny_experiment

HOSTS = """
[[hosts]]
name = "gpu-a"
ssh = "u@gpu-a"
arms = ["rand", "top"]
num_gpus = 4
"""


def cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(["armlab", *map(str, args)], capture_output=True, text=True, timeout=120)


def spec_file(tmp_path: Path, **replace: str) -> Path:
    make_pool(tmp_path / "pool", 600, n_files=2)
    text = experiment_toml(tmp_path / "wd", str(tmp_path / "pool"), eval_docs=50) + HOSTS
    text = text.replace("[model]\ndepth = 2", "[train]\nseeds = [0, 1, 2]\n\n[model]\ndepth = 2")
    for old, new in replace.items():
        text = text.replace(old, new)
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def test_costs_follow_from_flops_per_token(tmp_path: Path) -> None:
    exp = load_experiment(spec_file(tmp_path))
    b = training_budget(exp)
    rows = {r.gpu: r for r in costs(exp, parse_mfu(["0.5", "A100=0.25"]))}
    h100 = rows["H100"]
    flops = b.flops_per_token * b.tokens
    assert h100.flops == flops and h100.runs == 2 * 3 and h100.gpus_per_run == 4  # the host's GPUs
    assert h100.gpu_hours == pytest.approx(flops / (989e12 * 0.5) / 3600)
    assert h100.wall_hours == pytest.approx(h100.gpu_hours / 4)
    assert rows["A100"].gpu_hours == pytest.approx(flops / (PEAK_FLOPS["A100"] * 0.25) / 3600)
    assert rows["H200"].total_gpu_hours == pytest.approx(6 * h100.gpu_hours)


def test_plan_prints_the_price(tmp_path: Path) -> None:
    exp_file = spec_file(tmp_path)
    r = cli("plan", exp_file, "--mfu", "H100=0.5", "--gpus", "2", "--usd-per-gpu-hour", "2.5")
    assert r.returncode == 0, r.stderr
    exp = load_experiment(exp_file)
    h100 = next(c for c in costs(exp, parse_mfu(["H100=0.5"]), 2) if c.gpu == "H100")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("H100"))
    cells = line.split()
    assert cells[1] == "50%" and "wall/run (2 GPUs)" in r.stdout and "$/run @ $2.5/GPU-h" in r.stdout
    assert float(cells[2]) == pytest.approx(h100.gpu_hours, rel=2e-3)
    assert float(cells[-1]) == pytest.approx(h100.total_gpu_hours * 2.5, rel=2e-3)
    assert f"{len(exp.arms) * 3} runs (2 arms x 3 seeds)" in r.stdout
    assert "noise: unknown (no finished runs yet)" in r.stdout


@pytest.mark.parametrize(
    "flag, message",
    [("2", "MFU is a fraction of peak"), ("V100=0.3", "unknown GPU 'V100'"), ("fast", "expected a fraction")],
)
def test_bad_mfu_is_refused(tmp_path: Path, flag: str, message: str) -> None:
    r = cli("plan", spec_file(tmp_path), "--mfu", flag)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_a_score_column_not_in_the_pool_is_refused(tmp_path: Path) -> None:
    exp_file = spec_file(tmp_path, **{'score_column = "score"': 'score_column = "quality"'})
    assert 'score_column = "quality"' in exp_file.read_text()
    r = cli("plan", exp_file)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "part-000.parquet: no column 'quality'" in lines[0] and "arm 'top'" in lines[0]
    assert not (tmp_path / "wd").exists() and r.stdout == ""


def pilot(tmp_path: Path, seeds: list[int]) -> Path:
    """A pilot workdir: two arms, per-item CORE and per-document bpb, `seeds` each."""
    rng = random.Random(3)
    exp = tiny_experiment(tmp_path / "pilot", seeds=seeds)
    nbytes = [rng.randint(100, 900) for _ in range(80)]
    for seed in seeds:
        for arm, p, rate in (("top", 0.6, 0.95), ("random", 0.5, 1.0)):
            shift = rng.gauss(0, 0.02)
            correct = [int(rng.random() < p + shift + (0.2 if i % 3 == 0 else -0.1)) for i in range(120)]
            nats = [b * (rate + shift) * rng.uniform(0.95, 1.05) for b in nbytes]
            make_run(exp, arm, seed, bpb=0.0, core_tasks={"t": {"correct": correct, "random_baseline": 25.0}},
                     per_doc=(nats, nbytes))  # fmt: skip
    return exp.workdir_path


def test_detect_uses_the_pilots_noise(tmp_path: Path) -> None:
    pilot_dir = pilot(tmp_path, [0, 1, 2])
    exp_file = spec_file(tmp_path)
    r = cli("plan", exp_file, "--pilot", pilot_dir, "--detect", "0.03")
    assert r.returncode == 0, r.stderr
    spreads = {s.metric: s for s in pilot_spreads(load_experiment(pilot_dir))}
    core = spreads["core"]
    assert "noise (pilot 'tiny': top vs random, 3 paired seeds)" in r.stdout
    assert "the pilot is depth 2, this experiment depth 2" not in r.stdout
    mdd = detectable(core.seed_var, core.item_var, 3)  # the experiment plans train.seeds = [0, 1, 2]
    line = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("CORE:"))
    assert f"detects differences >= {mdd:.4f}" in line
    n = seeds_needed(core.seed_var, core.item_var, 0.03)
    want = f"to detect 0.03: {n} seeds per arm" if n else "to detect 0.03: no number of seeds suffices"
    assert want in r.stdout
    assert re.search(r"val bpb: one seed's difference sd \d\.\d{4}, eval-item sd \d\.\d{4}", r.stdout)


def test_a_pilot_without_seed_spread_is_refused(tmp_path: Path) -> None:
    one_seed = pilot(tmp_path, [0])
    r = cli("plan", spec_file(tmp_path), "--pilot", one_seed)
    assert r.returncode == 2 and "no arm has 2 or more finished seeds" in r.stderr
    with pytest.raises(ArmlabError, match="no arm has 2 or more finished seeds"):
        pilot_spreads(load_experiment(one_seed))
    r = cli("plan", spec_file(tmp_path), "--pilot", tmp_path / "nowhere")
    assert r.returncode == 2 and "nowhere" in r.stderr and "Traceback" not in r.stderr


def test_plan_prices_a_ladder_depth_by_depth(tmp_path: Path) -> None:
    exp_file = spec_file(tmp_path, **{"[model]\ndepth = 2": "[ladder]\ndepths = [1, 2, 3]\n\n[model]\ndepth = 3"})
    r = cli("plan", exp_file, "--mfu", "H100=0.5")
    assert r.returncode == 0, r.stderr
    exp = load_experiment(exp_file)
    lines = r.stdout.splitlines()
    assert "ladder: 3 depths x 2 arms x 3 seeds, each depth ratio 12 x its own parameters" in lines
    hours = []
    for d in (1, 2, 3):
        b = training_budget(exp.at_depth(d))
        row = next(ln for ln in lines if ln.startswith(f"d{d}")).split()
        assert float(row[-4]) == pytest.approx(b.flops_per_token * b.tokens, rel=1e-3)
        hours.append(b.flops_per_token * b.tokens / (989e12 * 0.5) / 3600 * 6)
    total = next(ln for ln in lines if ln.startswith("ladder total:"))
    more = sum(hours) / hours[-1] - 1
    assert f"({more:.0%} more than the target depth alone)" in total
