"""The report files: report.md, a self-contained report.html (figures base64-embedded), the
figures themselves and summary.json. Markdown and HTML are rendered from the same sections."""

from __future__ import annotations

import base64
import html
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from armlab.report.datadiff import histogram, score_table
from armlab.report.plots import plot_core_tasks, plot_curves, plot_data, plot_final
from armlab.report.verdict import METRICS, digits
from armlab.spec import DCLM_EVAL_BUNDLE_URL
from armlab.workdir import atomic_write_json, atomic_write_text

METHOD_NAMES = {
    "seeds+items": "seeds + items",
    "seeds": "seeds only",
    "items": "items only",
    "none": "no interval",
}


@dataclass
class Section:
    title: str
    lines: list[str] = field(default_factory=list)  # paragraphs / bullet items
    tables: list[tuple[list[str], list[list[str]]]] = field(default_factory=list)
    bullets: bool = False


def fmt_interval(iv: dict[str, Any] | None, d: int | None = None, sign: str = "") -> str:
    """`0.1234 [0.1100, 0.1368]`, or the estimate alone without an interval; sign="+" for differences."""
    if not iv:
        return "-"
    d = d or digits(iv["low"], iv["high"])
    if iv["low"] is None:
        return f"{iv['estimate']:{sign}.{d}f}"
    return f"{iv['estimate']:{sign}.{d}f} [{iv['low']:{sign}.{d}f}, {iv['high']:{sign}.{d}f}]"


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


def core_name(summary: dict[str, Any]) -> str:
    return "CORE (demo tasks)" if (summary.get("bundle") or {}).get("demo") else "CORE"


def coverage_note(summary: dict[str, Any]) -> str:
    """What the val bpb figures cover (the same for every run: compare refuses otherwise)."""
    ev = next(iter(summary["arms"].values()))["eval"]
    if ev.get("val_bpb_tokens"):
        docs = f" in {ev['val_bpb_docs']:,} documents" if ev.get("val_bpb_docs") else ""
        return (
            f"val bpb: the final evaluation over {ev['val_bpb_tokens']:,} tokens{docs} of the shared eval set"
        )
    cap = ev.get("eval_tokens_cap")
    cap_txt = f"at most the first {cap:,} tokens" if cap else "an unrecorded part"
    return (
        f"val bpb: {cap_txt} of the shared eval set (eval.json from an older armlab records no exact count)"
    )


def arms_section(summary: dict[str, Any]) -> Section:
    arms = summary["arms"]
    header = [
        "arm",
        "kind",
        "seeds",
        "final val bpb",
        core_name(summary),
        "tokens trained",
        "epochs",
        "training time",
    ]
    rows = [
        [
            a,
            e["kind"],
            ",".join(str(r["seed"]) for r in e["runs"]),
            fmt_interval(e["val_bpb"]),
            fmt_interval(e["core"]),
            fmt_count((e["tokens"] or {}).get("mean")),
            "-" if not e["epoch"] else f"{e['epoch']['mean']:.2f}",
            _duration((e["train_time_s"] or {}).get("mean")),
        ]
        for a, e in arms.items()
    ]
    runs = [
        [
            a,
            r["run"],
            str(r["seed"]),
            f"{r['step']:,}",
            "-" if r["val_bpb"] is None else f"{r['val_bpb']:.4f}",
            "-" if r["core"] is None else f"{r['core']:.4f}",
            "-" if r["tokens"] is None else f"{r['tokens']:,}",
        ]
        for a, e in arms.items()
        for r in e["runs"]
    ]
    sec = Section("Arms (mean over seeds [95% CI])", [coverage_note(summary) + "."])
    sec.tables += [
        (header, rows),
        (["arm", "run", "seed", "steps", "final val bpb", core_name(summary), "tokens"], runs),
    ]
    labels = list(dict.fromkeys(t for e in arms.values() for t in e["core_tasks"]))
    if labels:
        items = next(iter(arms.values()))["eval"]["core_items"]
        sec.tables.append(
            (
                ["task", "items", *[f"{a}: centred accuracy" for a in arms]],
                [
                    [
                        t,
                        str(items.get(t, "-")),
                        *(fmt_interval(e["core_tasks"].get(t)) for e in arms.values()),
                    ]
                    for t in labels
                ],
            )
        )
    return sec


def comparison_section(summary: dict[str, Any]) -> Section:
    rows = []
    for c in summary["comparisons"]:
        label = METRICS[c["metric"]][0] if c["metric"] != "core" else core_name(summary)
        d = digits(c["low"], c["high"])
        det = c.get("detectable")
        rows.append(
            [
                f"{c['arm']} - {c['reference']}",
                label,
                fmt_interval(c, d, sign="+"),
                "paired" if c["paired"] else "unpaired",
                METHOD_NAMES[c["method"]],
                "-" if c["df"] is None else f"{c['df']:.1f}",
                "-" if det is None else f"{det:.{d}f}",
            ]
        )
    sec = Section("Differences against the reference arm")
    sec.tables.append(
        (["arms", "metric", "difference [95% CI]", "seeds", "noise counted", "df", "detectable"], rows)
    )
    sec.lines.append(
        "`detectable`: the smallest true difference this design (its seeds, its eval set) detects at 95% "
        "two-sided with 80% power, from the observed noise; `armlab plan EXP --detect X` says how many "
        "seeds a smaller one needs."
    )
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


def data_section(summary: dict[str, Any]) -> Section | None:
    data = (summary.get("data") or {}).get("arms")
    absent = (summary.get("data") or {}).get("absent") or {}
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


def notes(summary: dict[str, Any]) -> list[str]:
    out = list(summary.get("notes", []))
    b = summary.get("bundle")
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
        f"Intervals ({summary['resamples']:,} paired resamples, seed {summary['bootstrap_seed']}): seed noise from the "
        "spread of per-seed values (paired by seed when both arms ran the same seeds, else Welch) plus the eval "
        "items' own noise from a paired bootstrap over items within each CORE task / over eval documents, the "
        "seed-by-item interaction counted once; the seed half-width (t, seed df) and the item half-width (normal) "
        "add in quadrature, clipped to the metric's range. "
        "`seeds only`: no per-item data in eval.json; `items only`: one seed, training noise not counted. "
        "With fewer than 3 seeds an interval is weak (its seed noise is a 1-df guess)."
    )
    out.append(f"Differences are against the reference arm `{summary['reference_arm']}`.")
    for x in summary["excluded"]:
        out.append(f"Excluded run `{x['run']}` (arm {x['arm']}): state {x['state']}.")
    return out


def sections(summary: dict[str, Any]) -> list[Section]:
    out = [
        Section(
            "Verdict",
            list(summary["verdict"]) + [f"warning: {w}" for w in summary.get("warnings", [])],
            bullets=True,
        )
    ]
    out += [comparison_section(summary), arms_section(summary)]
    if summary.get("continuous"):
        from armlab.report.continuous import table

        lines, header, rows = table(summary["continuous"])
        out.append(Section("Continuous CORE and signal-to-noise", lines, [(header, rows)] if rows else []))
    data = data_section(summary)
    if data:
        out.append(data)
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], figures: list[Path]) -> str:
    parts = [
        f"# {summary['experiment']}: comparison report",
        "",
        f"Experiment fingerprint `{summary['fingerprint']}`; generated "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(summary['created']))}.",
        "",
    ]
    for sec in sections(summary):
        parts += [f"## {sec.title}", ""]
        parts += [f"- {line}" for line in sec.lines] if sec.bullets else [line + "\n" for line in sec.lines]
        parts += [""] if sec.bullets else []
        for header, rows in sec.tables:
            parts += [_md_table(header, rows), ""]
    parts += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    parts += ["## Notes", ""] + [f"- {n}" for n in notes(summary)] + [""]
    return "\n".join(parts)


def render_html(summary: dict[str, Any], figures: list[Path]) -> str:
    e = html.escape
    body = [
        f"<h1>{e(summary['experiment'])}: comparison report</h1>",
        f"<p>Experiment fingerprint <code>{e(summary['fingerprint'])}</code>.</p>",
    ]
    for sec in sections(summary):
        body.append(f"<h2>{e(sec.title)}</h2>")
        if sec.bullets:
            body.append("<ul>" + "".join(f"<li>{e(x)}</li>" for x in sec.lines) + "</ul>")
        else:
            body += [f"<p>{e(x)}</p>" for x in sec.lines]
        for header, rows in sec.tables:
            body.append(
                "<table><tr>"
                + "".join(f"<th>{e(h)}</th>" for h in header)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                + "</table>"
            )
    body.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.read_bytes()).decode()
        body.append(f'<p><img alt="{e(f.stem)}" src="data:image/png;base64,{data}"></p>')
    body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in notes(summary)) + "</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(summary['experiment'])}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(summary: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        p
        for p in (
            plot_curves(summary, out / "curves.png"),
            plot_final(summary, out / "final.png"),
            plot_core_tasks(summary, out / "core_tasks.png"),
            plot_data(summary, out / "data.png"),
        )
        if p is not None
    ]
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_markdown(summary, figures))
    atomic_write_text(out / "report.html", render_html(summary, figures))
    return [out / "summary.json", out / "report.md", out / "report.html", *figures]
