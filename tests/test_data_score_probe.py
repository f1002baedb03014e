"""`armlab plan` prices scoring: each scorer's real model timed on the first pool documents here,
its docs/s per core, and the CPU-hours of the documents not scored yet (all, then none once
`armlab score` ran)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from armlab.cli import main
from armlab.data.score.probe import render_scoring, scoring_plan
from armlab.data.score.run import score
from armlab.spec import load_experiment
from score_util import demo_documents, make_head, make_scored_pool, train_fasttext
from test_data_score_run import experiment


def plan_output(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, exp: Path) -> str:
    monkeypatch.setattr(sys, "argv", ["armlab", "plan", str(exp)])
    try:
        main()
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    return capsys.readouterr().out


def test_plan_prices_scoring_from_a_probe_of_each_real_model(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    good, junk = demo_documents(n_junk=60)
    make_scored_pool(tmp_path / "pool", good[:240], junk[:40])
    train_fasttext(tmp_path / "quality.bin", good[240:], junk[40:])
    make_head(tmp_path / "head.safetensors", dim=8)
    exp_file = experiment(tmp_path)

    out = plan_output(capsys, monkeypatch, exp_file)
    assert "scoring (`armlab score`): docs/s measured here by each real model on the first pool documents (ft 140, emb 140)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if re.match(r"^(ft|emb)\s", line)}
    assert re.search(r"^ft\s+fasttext\s+cpu\s+[\d,]+ per core\s+280 of 280 docs\s+[\d.]+ CPU-hours\s+\S+ s on \d+ cores", rows["ft"])
    assert re.search(r"^emb\s+head\s+cpu\s+[\d,]+ per core\s+280 of 280 docs", rows["emb"])

    exp = load_experiment(exp_file)
    score(exp, names=["ft"])
    probes = {p.scorer: p for p in scoring_plan(exp)}
    assert probes["ft"].todo == 0 and probes["emb"].todo == 280 and probes["ft"].total == 280
    assert probes["ft"].docs_per_s > 0 and probes["ft"].docs == 140  # the first file's documents
    assert "0 of 280 docs" in render_scoring(list(probes.values()))
