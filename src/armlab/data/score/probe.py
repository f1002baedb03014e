"""What scoring the pool costs, measured on this host: `armlab plan`'s scoring lines.

Per scorer: load the real model (downloading it once, as `score` would), read the first
PROBE_DOCS documents of the first pool file, score one warm-up batch, then time blocks of
documents through what a unit does (keys + the model) until PROBE_DOCS are scored or
PROBE_SECONDS have passed. The rate is per worker (one core, or one GPU: the unit of `score`'s
parallelism), times this host's workers for the wall time here, and the pool's documents not
yet scored (from the parquet footers and the scores manifest) give CPU- or GPU-hours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa

from armlab.data.identity import doc_keys
from armlab.data.plan import fmt_duration
from armlab.data.pool import PoolFile, file_stats, iter_columns, list_pool
from armlab.data.prepare.keys import as_text
from armlab.data.score import models
from armlab.data.score.backends import get_backend
from armlab.data.score.sidecar import read_manifest, relative_names, scorer_dir
from armlab.data.score.units import read_columns
from armlab.spec import Experiment, ScorerSpec

PROBE_DOCS = 512
PROBE_SECONDS = 5.0
WARMUP_DOCS = 16


@dataclass(frozen=True)
class Probe:
    scorer: str
    kind: str
    device: str  # "cpu" | "cuda"
    workers: int  # this host's cores, or GPUs
    docs: int  # scored by the probe
    docs_per_s: float  # per worker
    todo: int  # pool documents not scored yet (-1: unknown, jsonl)
    total: int

    @property
    def worker_hours(self) -> float | None:
        return self.todo / self.docs_per_s / 3600 if self.todo >= 0 and self.docs_per_s else None


def sample(exp: Experiment, scorer: ScorerSpec, pf: PoolFile, n: int) -> pa.Table:
    """The first `n` rows of the columns a unit reads."""
    read, _ = read_columns(scorer, exp.pool)
    parts, got = [], 0
    for t in iter_columns(pf, read, types={exp.pool.text_column: pa.string()}):
        parts.append(t)
        got += t.num_rows
        if got >= n:
            break
    return pa.concat_tables(parts).slice(0, n) if parts else pa.table({c: [] for c in read})


def probe(exp: Experiment, scorer: ScorerSpec, files: list[PoolFile]) -> Probe:
    backend = get_backend(scorer.kind)
    device, workers = backend.devices(None)
    resolved = models.resolve(scorer)
    model = backend.load(scorer, resolved.path, "cuda:0" if device == "cuda" else "cpu")
    table = sample(exp, scorer, files[0], PROBE_DOCS)
    _, scored = read_columns(scorer, exp.pool)
    text = exp.pool.text_column
    block = max(WARMUP_DOCS, scorer.batch_size if scorer.kind == "hf" else 128)

    def unit(t: pa.Table) -> None:  # what units.run_score_task does with a block
        texts = (
            as_text(files[0].name, text, t.column(text).combine_chunks(), "")
            if text in t.column_names
            else None
        )
        doc_keys(t.column(exp.pool.id_column) if exp.pool.id_column else None, texts)
        model.score(t.select(scored))

    unit(table.slice(0, WARMUP_DOCS))
    done, t0 = 0, time.perf_counter()
    while done < table.num_rows and (done == 0 or time.perf_counter() - t0 < PROBE_SECONDS):
        unit(table.slice(done, block))
        done += min(block, table.num_rows - done)
    rate = done / max(time.perf_counter() - t0, 1e-9)
    todo, total = pool_todo(exp, scorer, files)
    return Probe(scorer.name, scorer.kind, device, workers, done, rate, todo, total)


def pool_todo(exp: Experiment, scorer: ScorerSpec, files: list[PoolFile]) -> tuple[int, int]:
    """(documents not scored yet, all documents), from the footers; -1 when a file cannot say (jsonl)."""
    manifest = read_manifest(scorer_dir(exp, scorer.name))
    rel = relative_names(exp.pool.uri, files)
    todo = total = 0
    for pf in files:
        rows = file_stats(pf, exp.pool.text_column).rows
        if rows < 0:
            return -1, -1
        total += rows
        entry = manifest.files.get(rel[pf.name]) if manifest else None
        if entry is None or entry.identity != pf.identity:
            todo += rows
    return todo, total


def scoring_plan(exp: Experiment) -> list[Probe]:
    files = list_pool(exp.pool)
    return [probe(exp, s, files) for s in exp.scorers]


def render_scoring(probes: list[Probe]) -> str:
    """plan's scoring table: per scorer, the measured rate and what the rest of the pool costs."""
    rows = [("scorer", "kind", "device", "docs/s", "to score", "hours", "wall time here")]
    for p in probes:
        unit = "GPU" if p.device == "cuda" else "core"
        hours = p.worker_hours
        rows.append(
            (
                p.scorer,
                p.kind,
                "cuda bf16" if p.device == "cuda" else "cpu fp32" if p.kind == "hf" else "cpu",
                f"{p.docs_per_s:,.0f} per {unit}",
                "?" if p.todo < 0 else f"{p.todo:,} of {p.total:,} docs",
                "?" if hours is None else f"{hours:,.2f} {'GPU' if unit == 'GPU' else 'CPU'}-hours",
                "?" if hours is None else f"{fmt_duration(hours * 3600 / p.workers)} on {p.workers} {unit}s",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    probed = ", ".join(f"{p.scorer} {p.docs:,}" for p in probes)
    note = (
        f"scoring (`armlab score`): docs/s measured here by each real model on the first pool documents ({probed}); "
        "an hf scorer runs bf16 on every GPU of a GPU host: run plan there to price its GPU-hours"
    )
    return f"{note}\n{table}"
