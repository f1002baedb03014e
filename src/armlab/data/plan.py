"""`armlab plan EXP`: per arm, the data available vs what one training run will consume.

Prepared arms report their manifest's rows, chars and tokens (exact when the pool has a token
count column, else chars / 4). Unprepared arms are estimated from the pool's parquet metadata
(rows and uncompressed text size, no data read) times the arm's ratio, after the eval holdout
and any max_rows / max_tokens cap. The run's consumption is `budget.training_budget(exp)`; an
arm smaller than that is repeated (DESIGN.md invariant 7) and gets a warning.

For a remote pool, `download_plan` adds what `prepare` will fetch in each `[pool] fetch` mode
(from the parquet footers, one ranged read a file) and how long that takes at a link speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from armlab.budget import Budget, training_budget
from armlab.data.pool import (
    BadFile,
    PoolFile,
    describe_error,
    file_stats,
    list_pool,
    missing_columns,
    parquet_schema,
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
    names = parquet_schema(first).names
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


def plan(exp: Experiment, budget: Budget | None = None) -> list[ArmPlan]:
    """Every arm's data vs the tokens one run consumes (`budget`: the plan's, else the spec's)."""
    wd = open_workdir(exp, create=False)
    budget_tokens = (budget or training_budget(exp)).tokens
    if exp.ladder.depths:  # a ladder: its largest depth consumes the most tokens
        budget_tokens = max(training_budget(r).tokens for r in exp.rungs())
    pool: PoolEstimate | None = None
    out = []
    for arm in exp.arms:
        mpath = wd.data_dir(arm.name) / MANIFEST
        m = read_json(mpath) if mpath.is_file() else None
        if m and m.get("complete"):
            tokens = m.get("tokens") or m.get("tokens_estimate")
            out.append(ArmPlan(arm.name, arm.kind, "manifest", m["rows"], m["chars"], tokens, budget_tokens))
        elif arm.kind == "prebuilt":
            out.append(ArmPlan(arm.name, arm.kind, "unknown", None, None, None, budget_tokens))
        else:
            pool = pool or pool_estimate(exp)
            rows, chars, tokens = _estimate(exp, arm, pool)
            out.append(ArmPlan(arm.name, arm.kind, "estimate", rows, chars, tokens, budget_tokens))
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


def render(
    exp: Experiment, plans: list[ArmPlan], budget: Budget | None = None, vocab: tuple[int, str] | None = None
) -> tuple[str, list[str]]:
    """The plan as a text table, and one warning line per arm that a run would repeat. `vocab`:
    (the vocabulary the budget assumes, where it comes from)."""
    b = budget or training_budget(exp)
    size, source = vocab or (exp.tokenizer.vocab_size, "tokenizer.vocab_size")
    head = (
        f"{exp.name}: depth {exp.model.depth}, {b.params.total / 1e6:,.1f}M params "
        f"({b.params.scaling / 1e6:,.1f}M scaling; vocab {size:,}: {source}), "
        f"{b.num_iterations:,} steps x {b.total_batch_size:,} tokens = {fmt(b.tokens)} tokens per run\n"
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
            what = f"arm {p.arm!r} holds {fmt(p.tokens)} tokens but a run consumes {fmt(p.budget_tokens)}"
            if exp.train.allow_repeat:  # already allowed: say so, suggest nothing already set
                warnings.append(f"{what}: it is repeated {p.epochs:.2f}x (train.allow_repeat = true)")
            else:
                warnings.append(
                    f"{what}: train refuses to repeat it {p.epochs:.2f}x; raise its ratio or max_tokens, shorten "
                    "the run, or set train.allow_repeat = true"
                )
        if p.source == "unknown":
            warnings.append(
                f"arm {p.arm!r}: size unknown until prepared (`armlab prepare EXP --arm {p.arm}`)"
            )
    return head + table, warnings


# -- the download (remote pools) -------------------------------------------------------------------
FOOTER_THREADS = 8  # footers read in parallel (one ranged request a file)


@dataclass(frozen=True)
class DownloadPlan:
    """What `prepare` will fetch of a remote pool, from each file's footer: the key pass's
    columns, and the text pass's text column or whole files."""

    mode: str  # [pool] fetch
    ranges: bool  # the store honours Range (else every file is downloaded whole, in both passes)
    files: int  # remote files
    file_bytes: int
    key_bytes: int  # the key pass (its columns, footers included)
    text_column_bytes: int  # the text pass in "columns" mode (text chunks, footers included)

    def fetched(self, mode: str) -> int:
        if not self.ranges:
            return 2 * self.file_bytes
        return self.key_bytes + (self.text_column_bytes if mode == "columns" else self.file_bytes)

    def seconds(self, mode: str, link_mbps: float) -> float:
        return self.fetched(mode) * 8 / (link_mbps * 1e6)


def download_plan(exp: Experiment) -> DownloadPlan | None:
    """The bytes a full `prepare` fetches of the pool; None when the pool is local. Reads each
    remote parquet file's footer with one ranged request (jsonl counts whole, twice)."""
    from concurrent.futures import ThreadPoolExecutor

    from armlab.data.fetch import fetch_plan
    from armlab.data.prepare.keys import key_columns
    from armlab.data.ranged import RemoteParquet

    files = [f for f in list_pool(exp.pool) if f.remote]
    if not files:
        return None
    fetch = fetch_plan(exp.pool, files)
    key_cols = key_columns(exp, [a for a in exp.arms if a.kind != "prebuilt"]).read
    text_cols = [exp.pool.text_column]

    def one(pf: PoolFile) -> tuple[int, int]:
        if pf.fmt != "parquet" or not fetch.ranges:
            return pf.size, pf.size
        try:
            rf = RemoteParquet(pf)
        except (pa.ArrowException, OSError, ValueError) as e:
            raise BadFile(pf.name, describe_error(e)) from None
        return rf.planned_bytes(key_cols), rf.planned_bytes(text_cols)

    key = text = 0
    with progress(transient=True) as bar, ThreadPoolExecutor(FOOTER_THREADS) as pool:
        task = bar.add_task("pool footers", total=len(files), unit="files")
        for k, t in pool.map(one, files):
            key, text = key + k, text + t
            bar.update(task, advance=1)
    return DownloadPlan(fetch.mode, fetch.ranges, len(files), sum(f.size for f in files), key, text)


def fmt_bytes(n: float) -> str:
    for scale, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:,.0f} B"


def fmt_duration(s: float) -> str:
    for scale, unit in ((86400, "days"), (3600, "h"), (60, "min")):
        if s >= scale:
            return f"{s / scale:,.1f} {unit}"
    return f"{s:,.0f} s"


def render_download(d: DownloadPlan, link_mbps: float) -> str:
    """The download lines of `armlab plan`: the chosen mode first, then the other for comparison."""
    link = f"{link_mbps:,.0f} Mbit/s"
    head = f"download: {d.files:,} remote files, {fmt_bytes(d.file_bytes)}"
    if not d.ranges:
        return (
            f"{head}; the server ignores Range, so prepare downloads every file whole, once a pass: "
            f"{fmt_bytes(d.fetched(d.mode))}, ~{fmt_duration(d.seconds(d.mode, link_mbps))} at {link}"
        )
    lines = [head]
    for mode in (d.mode, "files" if d.mode == "columns" else "columns"):
        what = "key columns + text column" if mode == "columns" else "key columns + whole files"
        mark = "  (chosen: [pool] fetch)" if mode == d.mode else ""
        lines.append(
            f'  fetch = "{mode}": {what} = {fmt_bytes(d.fetched(mode))} '
            f"({d.fetched(mode) / max(d.file_bytes, 1):.2f}x the files), "
            f"~{fmt_duration(d.seconds(mode, link_mbps))} at {link}{mark}"
        )
    return "\n".join(lines)
