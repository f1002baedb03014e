"""`armlab plan EXP`: per arm, the data available vs what one training run will consume.

Prepared arms report their manifest's rows, chars and tokens (exact when the pool has a token
count column, else chars / 4). Unprepared arms are estimated from the pool's parquet metadata
(rows and uncompressed text size, no data read) times the arm's ratio, after the eval holdout
and any max_rows / max_tokens cap. The run's consumption is `budget.training_budget(exp)`; an
arm smaller than that is repeated (DESIGN.md invariant 7) and gets a warning.
"""

from __future__ import annotations

from dataclasses import dataclass

from armlab.budget import training_budget
from armlab.data.pool import (
    BadFile,
    PoolFile,
    describe_error,
    file_stats,
    list_pool,
    missing_columns,
    open_source,
)
from armlab.data.select import CHARS_PER_TOKEN
from armlab.data.shards import MANIFEST
from armlab.errors import ArmlabError
from armlab.progress import progress
from armlab.spec import ArmSpec, Experiment
from armlab.workdir import open_workdir, read_json


@dataclass(frozen=True)
class ArmPlan:
    arm: str
    kind: str
    source: str  # "manifest" | "estimate" | "unknown"
    rows: int | None
    chars: int | None
    tokens: int | None
    budget_tokens: int

    @property
    def epochs(self) -> float | None:
        return self.budget_tokens / self.tokens if self.tokens else None

    @property
    def repeats(self) -> bool:
        return self.epochs is not None and self.epochs > 1.0


@dataclass(frozen=True)
class PoolEstimate:
    rows: int
    chars: int


def check_columns(exp: Experiment, files: list[PoolFile]) -> None:
    """The arms' score columns exist, from the first parquet file's footer (a wrong score column
    would otherwise plan fine and fail only in prepare; the text column is checked by its size
    below). jsonl pools have no schema to read without reading documents; prepare checks them."""
    first = next((f for f in files if f.fmt == "parquet"), None)
    if first is None:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_source(first) as src:
            names = pq.ParquetFile(src).schema_arrow.names
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadFile(first.name, describe_error(e)) from None
    for a in exp.arms:
        if a.score_column and a.kind != "prebuilt":
            missing_columns(first, names, [a.score_column], f"set score_column of arm {a.name!r} to one of them")


def pool_estimate(exp: Experiment) -> PoolEstimate:
    files = list_pool(exp.pool)
    check_columns(exp, files)
    rows = chars = 0
    with progress(transient=True) as bar:
        task = bar.add_task("pool metadata", total=len(files), unit="files")
        for f in files:
            st = file_stats(f, exp.pool.text_column)
            rows += max(st.rows, 0)
            chars += st.text_bytes
            bar.update(task, advance=1)
    if rows > 0 and chars == 0:  # parquet metadata has no such column (or it is empty everywhere)
        raise ArmlabError(
            f"{exp.pool.uri}: no text in column {exp.pool.text_column!r} of any pool file; "
            "check [pool] text_column against the files' columns"
        )
    return PoolEstimate(rows, chars)


def _estimate(exp: Experiment, arm: ArmSpec, pool: PoolEstimate) -> tuple[int, int, int]:
    keep = max(pool.rows - exp.eval.docs, 0) / pool.rows if pool.rows else 0.0
    ratio = (arm.ratio or 1.0) * keep
    rows, chars = round(pool.rows * ratio), round(pool.chars * ratio)
    if arm.max_rows and rows > arm.max_rows:
        chars, rows = int(chars * arm.max_rows / rows), arm.max_rows
    tokens = int(chars / CHARS_PER_TOKEN)
    if arm.max_tokens and tokens > arm.max_tokens:
        rows, chars, tokens = (
            int(rows * arm.max_tokens / tokens),
            int(chars * arm.max_tokens / tokens),
            arm.max_tokens,
        )
    return rows, chars, tokens


def plan(exp: Experiment) -> list[ArmPlan]:
    wd = open_workdir(exp, create=False)
    budget = training_budget(exp).tokens
    pool: PoolEstimate | None = None
    out = []
    for arm in exp.arms:
        mpath = wd.data_dir(arm.name) / MANIFEST
        m = read_json(mpath) if mpath.is_file() else None
        if m and m.get("complete"):
            tokens = m.get("tokens") or m.get("tokens_estimate")
            out.append(ArmPlan(arm.name, arm.kind, "manifest", m["rows"], m["chars"], tokens, budget))
        elif arm.kind == "prebuilt":
            out.append(ArmPlan(arm.name, arm.kind, "unknown", None, None, None, budget))
        else:
            pool = pool or pool_estimate(exp)
            rows, chars, tokens = _estimate(exp, arm, pool)
            out.append(ArmPlan(arm.name, arm.kind, "estimate", rows, chars, tokens, budget))
    return out


def fmt(v: int | None, human: bool = True) -> str:
    if v is None:
        return "?"
    if not human:
        return f"{v:,}"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:,.2f}{unit}"
    return str(v)


def render(exp: Experiment, plans: list[ArmPlan]) -> tuple[str, list[str]]:
    """The plan as a text table, and one warning line per arm that a run would repeat."""
    b = training_budget(exp)
    head = (
        f"{exp.name}: depth {exp.model.depth}, {b.params.total / 1e6:,.1f}M params "
        f"({b.params.scaling / 1e6:,.1f}M scaling), {b.num_iterations:,} steps x {b.total_batch_size:,} tokens "
        f"= {fmt(b.tokens)} tokens per run\n"
    )
    rows = [("arm", "kind", "source", "docs", "chars", "tokens", "epochs")]

    for p in plans:
        rows.append(
            (
                p.arm,
                p.kind,
                p.source,
                fmt(p.rows, human=False),
                fmt(p.chars),
                fmt(p.tokens),
                "?" if p.epochs is None else f"{p.epochs:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    warnings = []
    for p in plans:
        if p.repeats:
            warnings.append(
                f"arm {p.arm!r} holds {fmt(p.tokens)} tokens but a run consumes {fmt(p.budget_tokens)}: "
                f"it would be repeated {p.epochs:.2f}x (raise its ratio / max_tokens, or set train.allow_repeat)"
            )
        if p.source == "unknown":
            warnings.append(
                f"arm {p.arm!r}: size unknown until prepared (`armlab prepare EXP --arm {p.arm}`)"
            )
    return head + table, warnings
