"""What differs in the arms' data: the report section that says what each arm actually trained on.

Two sources, both cheap at compare time:
- each arm's manifest: docs, chars, tokens, and `manifest["stats"]` when prepare wrote it (BRIEF
  "Arm data statistics"): a doc-length histogram on fixed log-spaced edges, the score histogram
  (edges shared by the arms of a pass), each scorer's score histogram (`armlab score`; the same
  edges for every arm of a pass), counts over `[report] group_column`, overlap with the arms of
  the same pass;
- a sample read now: `SAMPLE_DOCS` documents from row groups spread evenly over the arm's shards
  (shards are shuffled, so this is a fair sample), tokenized with the experiment's tokenizer:
  tokens per document and chars per token, which only the real tokenizer can say.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from armlab.data.shards import MANIFEST, shard_paths
from armlab.errors import ArmlabError
from armlab.spec import Experiment
from armlab.workdir import open_workdir, read_json

SAMPLE_DOCS = 2000
TOKEN_EDGES = [float(x) for x in np.unique(np.round(np.logspace(0, 6, 73)))]  # 1 .. 1M tokens, 12 a decade


@dataclass(frozen=True)
class Histogram:
    edges: list[float]
    counts: list[int]

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def log_spaced(self) -> bool:
        e = np.asarray(self.edges)
        return bool((e > 0).all() and len(e) > 2 and np.allclose(e[1:] / e[:-1], e[1] / e[0], rtol=1e-3))

    def mean(self) -> float | None:
        """Mean from bin midpoints (geometric midpoints for log-spaced bins)."""
        if not self.total:
            return None
        a, b = np.asarray(self.edges[:-1]), np.asarray(self.edges[1:])
        mids = np.sqrt(a * b) if self.log_spaced else (a + b) / 2
        return float(np.dot(mids, self.counts) / self.total)

    def quantile(self, q: float) -> float | None:
        """The q quantile, interpolated within its bin."""
        if not self.total:
            return None
        cum = np.cumsum(self.counts) / self.total
        i = int(np.searchsorted(cum, q))
        lo, hi = self.edges[i], self.edges[i + 1]
        before = cum[i - 1] if i else 0.0
        frac = (q - before) / max(cum[i] - before, 1e-12)
        return float(lo + frac * (hi - lo))


@dataclass(frozen=True)
class Sample:
    docs: int
    chars: int
    tokens: int | None  # None when the experiment's tokenizer is not trained yet
    doc_tokens: Histogram | None
    doc_tokens_quantiles: dict[str, float] | None = None  # p10, p50, p90, mean of the sample

    @property
    def chars_per_token(self) -> float | None:
        return self.chars / self.tokens if self.tokens else None


@dataclass(frozen=True)
class ArmData:
    """One arm's data as the report shows it."""

    arm: str
    docs: int
    chars: int
    tokens: int | None
    tokens_exact: bool
    doc_chars: Histogram | None
    score: Histogram | None
    score_column: str | None
    groups: dict[str, int] | None
    group_column: str | None
    overlap: dict[str, int] = field(default_factory=dict)
    sample: Sample | None = None
    scorers: dict[str, Histogram] = field(default_factory=dict)  # scorer -> its score's histogram
    scorers_unscored: dict[str, int] = field(default_factory=dict)  # scorer -> documents without a score


def _hist(raw: dict[str, Any] | None) -> Histogram | None:
    if not raw or not raw.get("edges") or not raw.get("counts"):
        return None
    if len(raw["edges"]) != len(raw["counts"]) + 1:
        raise ArmlabError(
            f"manifest stats histogram has {len(raw['edges'])} edges for {len(raw['counts'])} counts"
        )
    return Histogram([float(e) for e in raw["edges"]], [int(c) for c in raw["counts"]])


def sample_arm(data_dir: Path, tokenizer: Any | None, docs: int = SAMPLE_DOCS) -> Sample:
    """Read about `docs` documents from row groups spread evenly over the shards; tokenize them."""
    groups = []
    for path in shard_paths(data_dir):
        meta = pq.ParquetFile(path).metadata
        groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    if not groups:
        raise ArmlabError(f"{data_dir}: no shards to sample; prepare the arm with `armlab prepare EXP`")
    per_group = max(1, sum(n for *_, n in groups) // len(groups))
    want = min(len(groups), max(1, math.ceil(docs / per_group)))
    texts: list[str] = []
    for i in np.linspace(0, len(groups) - 1, want).round().astype(int):
        path, g, _ = groups[i]
        texts += pq.ParquetFile(path).read_row_group(g, columns=["text"]).column("text").to_pylist()
    texts = texts[:docs]
    chars = sum(len(t) for t in texts)
    if tokenizer is None:
        return Sample(len(texts), chars, None, None)
    lengths = [len(ids) for ids in tokenizer.encode(texts, prepend_bos=False)]
    counts, _ = np.histogram(np.clip(lengths, 1, TOKEN_EDGES[-1]), bins=TOKEN_EDGES)
    q = {f"p{p}": float(np.percentile(lengths, p)) for p in (10, 50, 90)} | {"mean": float(np.mean(lengths))}
    return Sample(len(texts), chars, int(sum(lengths)), Histogram(TOKEN_EDGES, [int(c) for c in counts]), q)


def arm_data(exp: Experiment, arm: str, tokenizer: Any | None, docs: int = SAMPLE_DOCS) -> ArmData | None:
    """The arm's data figures; None when its data is not on this machine (runs copied from the
    GPU hosts can be compared anywhere; the section then says so)."""
    data_dir = open_workdir(exp, create=False).data_dir(arm)
    try:
        m = read_json(data_dir / MANIFEST)
    except FileNotFoundError:
        return None
    stats = m.get("stats") or {}
    score = stats.get("score") or {}
    group = stats.get("group") or {}
    tokens = m.get("tokens")
    return ArmData(
        arm=arm,
        docs=int(m["rows"]),
        chars=int(m["chars"]),
        tokens=tokens if tokens is not None else m.get("tokens_estimate"),
        tokens_exact=tokens is not None,
        doc_chars=_hist(stats.get("doc_chars")),
        score=_hist(score),
        score_column=score.get("column"),
        groups={str(k): int(v) for k, v in (group.get("counts") or {}).items()} or None,
        group_column=group.get("column"),
        overlap={str(k): int(v) for k, v in (stats.get("overlap") or {}).items()},
        sample=sample_arm(data_dir, tokenizer, docs),
        scorers={n: h for n, raw in (stats.get("scorers") or {}).items() if (h := _hist(raw)) is not None},
        scorers_unscored={n: int(raw.get("nan", 0)) for n, raw in (stats.get("scorers") or {}).items()},
    )


def data_difference(exp: Experiment, arms: list[str], docs: int = SAMPLE_DOCS) -> dict[str, Any]:
    """The section's data (plain, for summary.json): per arm, manifest figures and a sample."""
    from armlab.tokenizer import load_experiment_tokenizer

    try:
        tok = load_experiment_tokenizer(exp)
    except (ArmlabError, FileNotFoundError):
        tok = None  # the sample then reports chars only
    found = {a: arm_data(exp, a, tok, docs) for a in arms}
    return {
        "arms": {a: asdict(d) for a, d in found.items() if d is not None},
        "absent": {
            a: str(open_workdir(exp, create=False).data_dir(a)) for a, d in found.items() if d is None
        },
        "sample_docs": docs,
        "tokenizer": tok.fingerprint if tok else None,
    }


def histogram(raw: dict[str, Any] | None) -> Histogram | None:
    """A Histogram back from its summary.json form."""
    return None if raw is None else Histogram(raw["edges"], raw["counts"])


SCORE_HEADER = ["score", "arm", "docs", "mean", "p10", "median", "p90", "no score"]


def score_table(data: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """Each arm's distribution of every score its manifest counted (the pool's score column and
    each scorer's), from the binned histograms (quantiles interpolated within a bin): one row per
    score and arm, arms of one score together. None when no arm has any."""
    rows = []
    scores: dict[str, dict[str, tuple[dict[str, Any], int | None]]] = {}
    for arm, d in data.items():
        if d.get("score"):
            scores.setdefault(f"column {d.get('score_column')}", {})[arm] = (d["score"], None)
        for name, h in (d.get("scorers") or {}).items():
            scores.setdefault(f"scorer {name}", {})[arm] = (h, (d.get("scorers_unscored") or {}).get(name, 0))
    for label, arms in scores.items():
        for arm, (raw, unscored) in arms.items():
            h = histogram(raw)
            assert h is not None
            cells = [h.mean(), h.quantile(0.1), h.quantile(0.5), h.quantile(0.9)]
            rows.append(
                [
                    label,
                    arm,
                    f"{h.total:,}",
                    *("-" if v is None else f"{v:.3f}" for v in cells),
                    "-" if unscored is None else f"{unscored:,}",
                ]
            )
    return (SCORE_HEADER, rows) if rows else None
