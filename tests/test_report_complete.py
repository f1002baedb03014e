"""Reports from complete data only (issue 12): final values come from a run's final records, and a
run whose metrics.jsonl is torn or shorter than its recorded steps is refused, naming both."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.report.compare import compare
from results_util import make_run, tiny_experiment


def two_arms(tmp_path: Path, with_eval: bool) -> tuple:
    exp = tiny_experiment(tmp_path / "wd")
    core = 0.1 if with_eval else None
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5000 + 0.001 * seed, core=core, steps=20)
        make_run(exp, "random", seed, bpb=1.5010 + 0.001 * seed, core=core, steps=20)
    return exp, exp.workdir_path / "arms/top/runs/top-s1/metrics.jsonl"


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("with_eval", [False, True], ids=["log-only", "with-eval.json"])
def test_a_truncated_metrics_log_is_refused_not_read_to_its_last_line(
    tmp_path: Path, with_eval: bool
) -> None:
    exp, metrics = two_arms(tmp_path, with_eval)
    _, whole = compare(exp)
    bpb = whole.comparison("top", "val_bpb").interval
    assert bpb.estimate == pytest.approx(-0.001)  # the true difference
    text = metrics.read_bytes()
    metrics.write_bytes(text[: int(len(text) * 0.6)])  # a copy cut short, mid-line
    with pytest.raises(ArmlabError) as e:
        compare(exp)
    assert str(metrics) in str(e.value) and "top-s1" in str(e.value) and "torn" in str(e.value)
    # cut at a line boundary: whole lines, but fewer steps than state.json records
    lines = text.decode().splitlines(keepends=True)
    metrics.write_text("".join(lines[: len(lines) // 2]))
    with pytest.raises(
        ArmlabError, match=r"metrics log stops at step 10 but state\.json records 20 steps"
    ) as e:
        compare(exp)
    assert str(metrics) in str(e.value) and "--exclude top-s1" in str(e.value)


def test_a_corrupt_line_in_the_middle_is_refused(tmp_path: Path) -> None:
    exp, metrics = two_arms(tmp_path, with_eval=True)
    lines = metrics.read_text().splitlines(keepends=True)
    lines[7] = '{"step": 7, "tokens": 70\x00\x00\x00\n'
    metrics.write_text("".join(lines))
    with pytest.raises(ArmlabError, match=r"line 8 is not a whole JSON record"):
        compare(exp)


def test_final_values_come_from_the_final_records(tmp_path: Path) -> None:
    exp, metrics = two_arms(tmp_path, with_eval=True)
    ev_path = metrics.parent / "eval.json"
    ev = json.loads(ev_path.read_text())
    ev_path.write_text(json.dumps({**ev, "val_bpb": 1.4}))  # the final evaluation, not the log's last line
    _, s = compare(exp)
    top = {r.run: r for r in s.arms["top"].runs}
    assert top["top-s1"].val_bpb == 1.4
    assert top["top-s1"].tokens == 20 * 1000 and top["top-s1"].step == 20  # state.json x batch
    ev_path.write_text(json.dumps({**ev, "step": 10}))
    with pytest.raises(ArmlabError, match=r"evaluated at step 10, not its final step 20"):
        compare(exp)


def test_the_cli_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    exp, metrics = two_arms(tmp_path, with_eval=False)
    text = metrics.read_bytes()
    metrics.write_bytes(text[: len(text) // 3])
    before = tree_hash(exp.workdir_path)
    spec = tmp_path / "exp.json"
    spec.write_text(json.dumps(exp.model_dump(mode="json")))
    wd = exp.workdir_path
    r = subprocess.run(["armlab", "compare", str(wd)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(metrics) in r.stderr
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1
    assert tree_hash(exp.workdir_path) == before and not (wd / "report").exists()
