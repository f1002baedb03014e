"""The report's sections, as data both renderers share (`render`: report.md and report.html):
the verdict, the differences with their intervals and detectable differences, val bpb per group,
the ladder, the arms, what differs in their data, and the notes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from armlab.report.datadiff import histogram, score_table
from armlab.report.intervals import Interval
from armlab.report.summary import Summary
from armlab.report.verdict import METRICS, digits
from armlab.spec import DCLM_EVAL_BUNDLE_URL

METHOD_NAMES = {
    "seeds+items": "seeds + items",
    "seeds": "seeds only",
    "items": "items only",
    "none": "no interval",
}
CLIP_MARK = "†"  # an interval end cut at the metric's range (CORE's 1.0, bpb's 0)


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)  # paragraphs / bullet items
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    bullets: bool = False


def fmt_interval(iv: Interval | None, d: int | None = None, sign: str = "") -> str:
    """`0.1234 [0.1100, 0.1368]`, or the estimate alone without an interval; sign="+" for
    differences; an end cut at the metric's range is marked with CLIP_MARK."""
    if iv is None:
        return "-"
    d = d or digits(iv.low, iv.high)
    if iv.low is None or iv.high is None:
        return f"{iv.estimate:{sign}.{d}f}"
    low, high = iv.low + 0.0, iv.high + 0.0  # a bound at -0.0 prints as 0
    lo_mark = CLIP_MARK if iv.clipped_side in ("low", "both") else ""
    hi_mark = CLIP_MARK if iv.clipped_side in ("high", "both") else ""
    return f"{iv.estimate:{sign}.{d}f} [{low:{sign}.{d}f}{lo_mark}, {high:{sign}.{d}f}{hi_mark}]"


def fmt_count(v: float | None) -> str:
    if v is None:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if v >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:,.0f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def core_name(summary: Summary) -> str:
    return "CORE (demo tasks)" if (summary.bundle or {}).get("demo") else "CORE"


def coverage_note(summary: Summary) -> str:
    """What the val bpb figures cover (the same for every run: compare refuses otherwise)."""
    ev = next(iter(summary.arms.values())).eval
    if ev.val_bpb_tokens:
        docs = f" in {ev.val_bpb_docs:,} documents" if ev.val_bpb_docs else ""
        return f"val bpb: the final evaluation over {ev.val_bpb_tokens:,} tokens{docs} of the shared eval set"
    cap = ev.eval_tokens_cap
    cap_txt = f"at most the first {cap:,} tokens" if cap else "an unrecorded part"
    return f"val bpb: {cap_txt} of the shared eval set (eval.json from an older armlab records no exact count)"


def arms_section(summary: Summary) -> Section:
    arms = summary.arms
    header = ["arm", "kind", "seeds", "final val bpb", core_name(summary), "tokens trained", "epochs", "training time"]
    rows = [
        [
            a,
            e.kind,
            ",".join(str(s) for s in e.seeds)
            + (f" (of {len(e.planned_seeds)} planned)" if len(e.runs) < len(e.planned_seeds) else ""),
            fmt_interval(e.val_bpb),
            fmt_interval(e.core),
            fmt_count(e.tokens),
            "-" if not e.epoch else f"{e.epoch:.2f}",
            _duration(e.train_time_s),
        ]
        for a, e in arms.items()
    ]
    runs = [
        [
            a,
            r.run,
            str(r.seed),
            f"{r.step:,}",
            "-" if r.val_bpb is None else f"{r.val_bpb:.4f}",
            "-" if r.core is None else f"{r.core:.4f}",
            "-" if r.tokens is None else f"{r.tokens:,}",
        ]
        for a, e in arms.items()
        for r in e.runs
    ]
    sec = Section("Arms (mean over seeds [95% CI])", [coverage_note(summary) + "."])
    sec.tables += [
        (header, rows),
        (["arm", "run", "seed", "steps", "final val bpb", core_name(summary), "tokens"], runs),
    ]
    labels = list(dict.fromkeys(t for e in arms.values() for t in e.core_tasks))
    if labels:
        items = next(iter(arms.values())).eval.core_items
        sec.tables.append(
            (
                ["task", "items", *[f"{a}: centred accuracy" for a in arms]],
                [
                    [t, str(items.get(t, "-")), *(fmt_interval(e.core_tasks.get(t)) for e in arms.values())]
                    for t in labels
                ],
            )
        )
    return sec


def fmt_detectable(c: Any, d: int) -> str:
    det = c.detectable
    if det is None:
        return "-"
    if det.low is None or det.high is None:
        return f"{det.value:.{d}f}"
    return f"{det.value:.{d}f} ({det.low:.{d}f}-{det.high:.{d}f})"


def ci_label(summary: Summary) -> str:
    """`95% CI`, or the level `run --until-decided` put every difference interval at."""
    level = max((c.interval.level for c in summary.comparisons), default=0.95)
    return f"{100 * level:.4g}% CI"


def comparison_section(summary: Summary) -> Section:
    rows = []
    for c in summary.comparisons:
        iv = c.interval
        label = METRICS[c.metric][0] if c.metric != "core" else core_name(summary)
        d = digits(iv.low, iv.high)
        rows.append(
            [
                f"{c.arm} - {c.reference}",
                label,
                fmt_interval(iv, d, sign="+"),
                "paired" if iv.paired else "unpaired",
                METHOD_NAMES[iv.method],
                "-" if iv.df is None else f"{iv.df:.1f}",
                fmt_detectable(c, d),
            ]
        )
    sec = Section("Differences against the reference arm")
    sec.tables.append(
        (["arms", "metric", f"difference [{ci_label(summary)}]", "seeds", "noise counted", "df", "detectable (range)"], rows)
    )
    sec.lines.append(
        "`detectable`: the smallest true difference this design (its seeds, its eval set) detects at 95% "
        "two-sided with 80% power, from the observed noise; in brackets the same at both ends of the seed "
        "noise's own 95% interval (with 3 seeds the seed SD is known only to within ~0.5x-6x, so this range "
        "is wide: a second set of 3 seeds can give a detectable difference 4x the first's). "
        "`armlab plan EXP --detect X` says how many seeds a smaller difference needs."
    )
    if any(c.interval.clipped for c in summary.comparisons) or any(
        iv is not None and iv.clipped for e in summary.arms.values() for iv in (e.val_bpb, e.core)
    ):
        sec.lines.append(f"{CLIP_MARK}: that end of the interval is cut at the metric's range (CORE <= 1, bpb >= 0).")
    return sec


def ladder_section(summary: Summary) -> Section | None:
    """The ranking at each depth of the ladder, and whether it holds up to the target depth."""
    lad = summary.ladder
    if lad is None:
        return None
    sec = Section("Ladder: the ranking at each depth", list(lad.verdict))
    metrics = [m for m in METRICS if any(m in r.differences for r in lad.rungs)]
    others = list(dict.fromkeys(a for r in lad.rungs for m in metrics for a in r.differences.get(m, {})))
    target = next((r for r in lad.rungs if r.depth == lad.target), None)
    header = ["depth", "params (scaling)", "tokens/run", "compute/run", "seeds"]
    header += [f"{a} - {lad.reference}: {METRICS[m][0]}" for m in metrics for a in others]
    rows = []
    for r in lad.rungs:
        share = f" ({r.flops / target.flops:.1%})" if target and target.flops and r is not target else ""
        rows.append(
            [
                f"d{r.depth}{' (target)' if r.depth == lad.target else ''}",
                fmt_count(r.params),
                fmt_count(r.tokens),
                f"{r.flops:.2e} FLOPs{share}",
                ", ".join(f"{a} {n}" for a, n in r.seeds.items()) or "-",
                *(fmt_interval(r.differences.get(m, {}).get(a), sign="+") for m in metrics for a in others),
            ]
        )
    sec.tables.append((header, rows))
    sec.lines += [f"d{r.depth}: no comparison: {r.missing}" for r in lad.rungs if r.missing]
    sec.lines.append(
        "Each depth trains target_param_data_ratio x its own parameters and is compared on its own (its runs' "
        "fingerprints differ by depth). After DataDecide (Magnusson et al. 2025): the ranking at one small scale "
        "picked the 1B winner in ~80% of pairs there; this ladder measures, on your data, from which depth the "
        "decision already agrees with the target's."
    )
    return sec


def groups_section(summary: Summary) -> Section | None:
    """Val bpb per group of eval documents: where each arm wins and loses."""
    g = summary.groups
    if g is None:
        if summary.groups_missing:
            return Section("Val bpb per group", [f"No per-group results: {summary.groups_missing}."])
        return None
    arms = list(summary.arms)
    others = [a for a in arms if a != summary.reference_arm]
    header = [g.column, "eval docs", "share of bytes", *[f"{a}" for a in arms], *[f"{a} - {summary.reference_arm}" for a in others]]
    rows = []
    for r in g.groups:
        rows.append(
            [
                r.label,
                f"{r.docs:,}",
                f"{r.byte_share:.1%}",
                *(fmt_interval(r.arms.get(a)) for a in arms),
                *(fmt_interval(r.differences.get(a), sign="+") for a in others),
            ]
        )
    what = f"quantile bins of {g.column} over the eval documents" if g.binned else f"values of {g.column}"
    sec = Section(f"Val bpb per {g.column}", list(g.verdict))
    sec.lines.append(
        f"Groups are {what}; each interval counts seed and eval-document noise as the pooled one does, at "
        f"{g.level:.2%} (Bonferroni over {len(g.groups)} groups), so all the groups' claims hold together at 95%."
    )
    sec.tables.append((header, rows))
    return sec


DATA_HEADER = [
    "arm",
    "docs",
    "chars",
    "tokens",
    "chars/doc (mean)",
    "chars/doc (median)",
    "tokens/doc (median, sample)",
    "chars/token (sample)",
    "score (mean, binned)",
]


def _data_row(arm: str, d: dict[str, Any]) -> list[str]:
    dc, sc = histogram(d["doc_chars"]), histogram(d["score"])
    s = d["sample"] or {}
    tok_med = (s.get("doc_tokens_quantiles") or {}).get("p50")
    cpt = s["chars"] / s["tokens"] if s.get("tokens") else None
    return [
        arm,
        f"{d['docs']:,}",
        fmt_count(d["chars"]),
        ("" if d["tokens_exact"] or d["tokens"] is None else "~") + fmt_count(d["tokens"]),
        f"{d['chars'] / d['docs']:,.0f}" if d["docs"] else "-",
        "-" if dc is None else f"{dc.quantile(0.5):,.0f}",
        "-" if tok_med is None else f"{tok_med:,.0f}",
        "-" if cpt is None else f"{cpt:.2f}",
        "-" if sc is None else f"{sc.mean():.3f}",
    ]


def _group_table(data: dict[str, Any], top: int = 15) -> tuple[list[str], list[list[str]]] | None:
    """Docs per value of the group column per arm (count and share), the most common first."""
    groups = {a: d["groups"] for a, d in data.items() if d.get("groups")}
    if not groups:
        return None
    column = next(d["group_column"] for d in data.values() if d.get("groups"))
    totals = {a: max(sum(g.values()), 1) for a, g in groups.items()}
    names = sorted(
        {k for g in groups.values() for k in g}, key=lambda k: -sum(g.get(k, 0) for g in groups.values())
    )

    def cell(n: int, a: str) -> str:
        return f"{n:,} ({n / totals[a]:.1%})"

    rows = [[k, *(cell(g.get(k, 0), a) for a, g in groups.items())] for k in names[:top]]
    if len(names) > top:
        rest = {a: sum(v for k, v in g.items() if k not in names[:top]) for a, g in groups.items()}
        rows.append([f"({len(names) - top} more)", *(cell(rest[a], a) for a in groups)])
    return [column, *groups], rows


def _overlaps(data: dict[str, Any]) -> list[str]:
    out, seen = [], set()
    for a, d in data.items():
        for b, both in (d.get("overlap") or {}).items():
            if b in data and (b, a) not in seen:
                seen.add((a, b))
                out.append(
                    f"{a} and {b} share {both:,} documents ({both / max(d['docs'], 1):.1%} of {a}, "
                    f"{both / max(data[b]['docs'], 1):.1%} of {b})."
                )
    return out


def data_section(summary: Summary) -> Section | None:
    data = (summary.data or {}).get("arms")
    absent = (summary.data or {}).get("absent") or {}
    if not data and not absent:
        return None
    sec = Section("What differs in the data")
    sec.lines += [f"arm {a}: its data is not on this machine ({p}); not shown." for a, p in absent.items()]
    if not data:
        return sec
    sec.tables.append((DATA_HEADER, [_data_row(a, d) for a, d in data.items()]))
    n = ", ".join(f"{d['sample']['docs']:,} of {a}" for a, d in data.items() if d.get("sample"))
    sec.lines.append(
        f"docs/chars/tokens from each arm's manifest (`~`: estimated at 4 chars a token); the sample columns "
        f"tokenize documents read now from row groups spread over each arm's shards ({n}) with the "
        "experiment's tokenizer."
    )
    if scores := score_table(data):  # every score's distribution per arm (columns and scorers)
        sec.tables.append(scores)
    groups = _group_table(data)
    if groups:
        sec.tables.append(groups)
    sec.lines += _overlaps(data)
    if not any(d.get("doc_chars") for d in data.values()):
        sec.lines.append(
            "The manifests carry no data statistics (prepared by an older armlab): length, score and group "
            "distributions appear once the arms are prepared again."
        )
    return sec


def notes(summary: Summary) -> list[str]:
    out = list(summary.notes)
    b = summary.bundle
    if b and b.get("demo"):
        out.append(
            "CORE here is computed on armlab demo's own small tasks (built from held-out eval documents) "
            "through the real CORE code, not on DCLM's 22 tasks; it shows the plumbing, not a benchmark."
        )
    elif b:
        dclm = (
            " (DCLM's eval bundle, the URL nanochat's base_eval downloads)"
            if b.get("source") == DCLM_EVAL_BUNDLE_URL
            else ""
        )
        sha = (
            f"archive sha256 {b['archive_sha256']}"
            if b.get("archive_sha256")
            else f"content sha256 {b.get('sha256')}"
        )
        out.append(
            f"CORE bundle: {b.get('name')} ({len(b.get('tasks', []))} tasks) from {b.get('source')}{dclm}, {sha}."
        )
    out.append(
        f"Intervals ({summary.resamples:,} paired resamples, seed {summary.bootstrap_seed}): seed noise from the "
        "spread of per-seed values (paired by seed when both arms ran the same seeds, else Welch) plus the eval "
        "items' own noise from a paired bootstrap over items within each CORE task / over eval documents, the "
        "seed-by-item interaction counted once; the seed half-width (t, seed df) and the item half-width (normal) "
        "combine as a p-norm (p from the seed df: 95% whatever the mix of the two noises), clipped to the metric's "
        "range. "
        "`seeds only`: no per-item data in eval.json; `items only`: one seed, training noise not counted. "
        "With fewer than 3 seeds an interval is weak (its seed noise is a 1-df guess)."
    )
    out.append(f"Differences are against the reference arm `{summary.reference_arm}`.")
    levels = {c.interval.level for c in summary.comparisons}
    if summary.decided:
        level = max(levels)
        out.append(
            f"Seeds were added until decided (`armlab run --until-decided`): the difference intervals are at "
            f"{100 * level:.4g}% each, 95% over every look the loop could take (Bonferroni), since stopping at the "
            "first 95% interval that excludes 0 would claim a difference too often. Its rounds: "
            + " | ".join(summary.decided)
        )
    for x in summary.excluded:
        out.append(f"Excluded run `{x.run}` (arm {x.arm}): state {x.state}.")
    return out


def sections(summary: Summary) -> list[Section]:
    out = [
        Section(
            "Verdict",
            list(summary.verdict)
            + (list(summary.groups.verdict) if summary.groups else [])
            + (list(summary.ladder.verdict) if summary.ladder else [])
            + [f"warning: {w}" for w in summary.warnings],
            bullets=True,
        )
    ]
    out += [comparison_section(summary)]
    for extra in (groups_section(summary), ladder_section(summary)):
        if extra:
            out.append(extra)
    out.append(arms_section(summary))
    if summary.continuous:
        from armlab.report.continuous import table

        lines, header, rows = table(summary.continuous)
        out.append(Section("Continuous CORE and signal-to-noise", lines, [(header, rows)] if rows else []))
    data = data_section(summary)
    if data:
        out.append(data)
    return out


