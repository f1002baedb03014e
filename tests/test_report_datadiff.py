"""The report's "what differs in the data" section, from manifests with prepare's `stats` schema
(BRIEF "Arm data statistics") and a sample of real shards tokenized by a real trained tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from armlab.report.compare import compare
from armlab.report.datadiff import sample_arm
from armlab.spec import parse_experiment
from armlab.tokenizer import train_experiment_tokenizer
from armlab.workdir import open_workdir
from results_util import make_run
from tok_util import corpus, write_shards

EDGES = [float(x) for x in np.logspace(1, 5, 9)]  # fixed log-spaced chars edges, shared by the arms
SCORE_EDGES = [0.0, 0.25, 0.5, 0.75, 1.0]


def hist(values: list[float], edges: list[float]) -> dict:
    return {"edges": edges, "counts": np.histogram(values, bins=edges)[0].tolist()}


def test_data_difference_section(tmp_path: Path) -> None:
    exp = parse_experiment(
        {
            "name": "dd",
            "workdir": str(tmp_path / "wd"),
            "pool": {"uri": str(tmp_path / "pool")},
            "tokenizer": {"vocab_size": 400, "train_chars": 200_000, "doc_cap": 2_000},
            "arms": [
                {"name": "top", "kind": "top", "ratio": 0.5, "score_column": "score"},
                {"name": "random", "kind": "random", "ratio": 0.5},
            ],
            "model": {"depth": 2, "max_seq_len": 64},
            "train": {"num_iterations": 10, "seeds": [0, 1]},
        }
    )
    wd = open_workdir(exp)
    docs = corpus()
    write_shards(wd.tokenizer_sample_dir, docs, files=2, row_group_rows=64)
    tok = train_experiment_tokenizer(exp)
    long_docs = sorted(docs, key=len)[len(docs) // 2 :]  # "top": the longer half, high scores, one group
    mixed = docs[::2]
    arms = {
        "top": (long_docs, [0.9] * len(long_docs), {"CC-MAIN-2024-10": len(long_docs)}),
        "random": (
            mixed,
            [0.1 + 0.8 * (i % 2) for i in range(len(mixed))],
            {"CC-MAIN-2024-10": 40, "CC-MAIN-2013-20": len(mixed) - 40},
        ),
    }
    both = len(set(long_docs) & set(mixed))
    for name, (texts, scores, groups) in arms.items():
        stats = {
            "doc_chars": hist([len(t) for t in texts], EDGES),
            "score": {"column": "score", **hist(scores, SCORE_EDGES)},
            "group": {"column": "dump", "counts": groups},
            "overlap": {"random" if name == "top" else "top": both},
        }
        write_shards(wd.data_dir(name), texts, files=3, row_group_rows=16, stats=stats)
    for seed in (0, 1):
        make_run(exp, "top", seed, bpb=1.5 + 0.01 * seed)
        make_run(exp, "random", seed, bpb=1.6 + 0.01 * seed)
    out, s = compare(exp)

    data = s.data["arms"]
    assert data["top"]["docs"] == len(long_docs) and data["random"]["docs"] == len(mixed)
    assert data["top"]["groups"] == {"CC-MAIN-2024-10": len(long_docs)}
    assert data["top"]["overlap"] == {"random": both}
    # the sample: every document (fewer than 2,000), tokenized with the experiment's tokenizer
    sample = data["random"]["sample"]
    assert sample["docs"] == len(mixed) and sample["chars"] == sum(map(len, mixed))
    assert sample["tokens"] == sum(len(ids) for ids in tok.encode(mixed, prepend_bos=False))
    assert data["top"]["sample"]["doc_tokens_quantiles"]["p50"] > sample["doc_tokens_quantiles"]["p50"]

    md = (out / "report.md").read_text()
    section = md.split("## What differs in the data")[1].split("## Figures")[0]
    assert f"| top | {len(long_docs):,} |" in section and f"| random | {len(mixed):,} |" in section
    assert (
        f"| CC-MAIN-2013-20 | 0 (0.0%) | {len(mixed) - 40:,} ({(len(mixed) - 40) / len(mixed):.1%}) |"
        in section
    )
    assert f"top and random share {both:,} documents ({both / len(long_docs):.1%} of top" in section
    assert "| 0.875 |" in section  # top's scores (0.9) all in the bin [0.75, 1.0]: its midpoint
    assert (out / "data.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["data"]["tokenizer"] == tok.fingerprint


def test_sample_reads_row_groups_spread_over_the_shards(tmp_path: Path) -> None:
    texts = [f"document number {i} " * (1 + i % 5) for i in range(1000)]
    d = write_shards(tmp_path / "arm", texts, files=5, row_group_rows=20)
    s = sample_arm(d, None, docs=100)
    assert s.docs == 100 and s.tokens is None
    whole = sample_arm(d, None, docs=5000)
    assert whole.docs == 1000 and whole.chars == sum(map(len, texts))
