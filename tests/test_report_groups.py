"""Val bpb per group of eval documents: two effects that cancel in the pooled number are each
found, with intervals, and the verdict names where the arm wins and where it loses."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from armlab.report.compare import compare
from armlab.spec import parse_experiment
from results_util import make_run

DOCS_GOOD, DOCS_JUNK = 120, 60
KINDS = ["good"] * DOCS_GOOD + ["junk"] * DOCS_JUNK


def experiment(workdir: Path, report: dict):
    return parse_experiment({
        "name": "tiny", "workdir": str(workdir), "pool": {"uri": str(workdir / "pool")},
        "arms": [{"name": "top", "kind": "top", "ratio": 0.5, "score_column": "score"},
                 {"name": "random", "kind": "random", "ratio": 0.5}],
        "model": {"depth": 2, "max_seq_len": 64}, "train": {"num_iterations": 10, "seeds": [0, 1, 2]},
        "report": report,
    })  # fmt: skip


def write_eval(workdir: Path, columns: dict) -> None:
    """The eval set as prepare writes it: texts and each document's labels, in eval-set order
    (written before the runs: their eval.json records its fingerprint, which compare checks)."""
    ev = workdir / "eval"
    ev.mkdir(parents=True)
    n = len(next(iter(columns.values())))
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(n)], **columns}), ev / "shard_00000.parquet")


def cancelling_runs(exp, rng: np.random.Generator) -> list[str]:
    """top is 3% better per byte on good documents and ~6% worse on junk, which hold a third of the
    bytes: the pooled difference is ~0. Seeds add a shared effect and per-document noise."""
    kinds = KINDS
    nbytes = rng.integers(300, 900, len(kinds)).astype(float)
    base = rng.uniform(0.8, 1.2, len(kinds))
    good = np.array([k == "good" for k in kinds])
    share = nbytes[good].sum() / nbytes.sum()
    effect = np.where(good, -0.03, 0.03 * share / (1 - share))  # byte-weighted mean effect 0
    for seed in (0, 1, 2):
        s = rng.normal(0, 0.004)
        for arm, eff in (("top", effect), ("random", 0.0)):
            rate = base * (1 + eff) * (1 + s + rng.normal(0, 0.003)) * (1 + rng.normal(0, 0.01, len(kinds)))
            make_run(exp, arm, seed, bpb=0.0, per_doc=((rate * nbytes).tolist(), nbytes.tolist()))
    return kinds


def test_per_group_bpb_finds_effects_that_cancel_in_the_pooled_number(tmp_path: Path) -> None:
    exp = experiment(tmp_path / "wd", {"group_column": "kind"})
    write_eval(tmp_path / "wd", {"group:kind": KINDS, "score:score": [0.5] * len(KINDS)})
    cancelling_runs(exp, np.random.default_rng(3))
    out, s = compare(exp)
    pooled = s.comparison("top", "val_bpb").interval
    assert pooled.low < 0 < pooled.high  # the pooled val bpb: within noise
    g = s.groups
    assert g.column == "kind" and not g.binned and g.level == pytest.approx(1 - 0.05 / 2)
    by = {r.label: r for r in g.groups}
    assert set(by) == {"good", "junk"} and by["good"].docs == DOCS_GOOD
    assert by["good"].byte_share + by["junk"].byte_share == pytest.approx(1.0)
    good, junk = by["good"].differences["top"], by["junk"].differences["top"]
    assert good.high < 0 < junk.low and good.level == g.level and good.method == "seeds+items"
    assert by["good"].arms["top"].estimate < by["good"].arms["random"].estimate
    (line,) = g.verdict
    assert line.startswith("top vs random by kind (val bpb per group): better on good (-0.0")
    assert ", worse on junk (+0.0" in line and " ± 0.0" in line
    md = (out / "report.md").read_text()
    assert f"- {line}" in md and "## Val bpb per kind" in md and "Bonferroni over 2 groups" in md
    assert (out / "groups.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_groups_by_quantile_bins_of_a_score(tmp_path: Path) -> None:
    exp = experiment(tmp_path / "wd", {"group_column": "quality", "group_bins": 3})
    quality = [0.9 - 0.001 * i if k == "good" else 0.1 + 0.001 * i for i, k in enumerate(KINDS)]
    quality[0] = math.nan  # a document without a score: its own group
    write_eval(tmp_path / "wd", {"score:quality": quality})
    cancelling_runs(exp, np.random.default_rng(5))
    _, s = compare(exp)
    g = s.groups
    sizes = [r.docs for r in g.groups]
    assert g.binned and sum(sizes[:3]) == 179 and all(59 <= n <= 60 for n in sizes[:3]) and sizes[3] == 1
    assert g.groups[-1].label == "quality (none)" and g.groups[0].label.startswith("quality 0.22-")
    low = g.groups[0].differences["top"]
    assert low.low > 0  # the lowest third by quality is the junk: top is worse there


def test_eval_set_without_labels_says_how_to_add_them(tmp_path: Path) -> None:
    exp = experiment(tmp_path / "wd", {"group_column": "kind"})
    write_eval(tmp_path / "wd", {"score:score": [0.5] * (DOCS_GOOD + DOCS_JUNK)})
    cancelling_runs(exp, np.random.default_rng(3))
    out, s = compare(exp)
    assert s.groups is None and "carries no 'group:kind' labels" in s.groups_missing
    assert "rerun `armlab prepare EXP` to add them" in (out / "report.md").read_text()
