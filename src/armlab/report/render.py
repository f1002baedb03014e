"""The report files: report.md, a self-contained report.html (figures base64-embedded), the
figures themselves and summary.json. Markdown and HTML are rendered from the same sections."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path

from armlab.report.plots import (
    plot_core_tasks,
    plot_curves,
    plot_data,
    plot_differences,
    plot_final,
    plot_groups,
    plot_ladder,
)
from armlab.report.sections import notes, sections
from armlab.report.summary import Summary
from armlab.workdir import atomic_write_text


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(summary: Summary, figures: list[Path]) -> str:
    parts = [
        f"# {summary.experiment}: comparison report",
        "",
        f"Experiment fingerprint `{summary.fingerprint}`; generated "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(summary.created))}.",
        "",
    ]
    for sec in sections(summary):
        parts += [f"## {sec.title}", ""]
        parts += [f"- {line}" for line in sec.lines] if sec.bullets else [line + "\n" for line in sec.lines]
        parts += [""] if sec.bullets else []
        for header, rows in sec.tables:
            parts += [_md_table(header, rows), ""]
    parts += ["## Figures", ""]
    for f in figures:
        parts += [f"![{f.stem}]({f.name})", "", f"*{FIGURE_CAPTIONS.get(f.stem, f.stem)}*", ""]
    parts += ["## Notes", ""] + [f"- {n}" for n in notes(summary)] + [""]
    return "\n".join(parts)


FIGURE_CAPTIONS = {
    "differences": "The verdict's evidence: each arm minus the reference, per metric, with its interval "
    "(seed + eval-item noise, paired by seed); dots are the per-seed differences. An interval that "
    "crosses 0 is within noise, even where the per-arm intervals in final.png do not overlap, and the "
    "other way round.",
    "final": "Each arm on its own: mean over seeds with its 95% interval; dots are seeds. Overlapping "
    "per-arm intervals do not mean 'no difference': the paired difference (differences.png) is the test.",
    "groups": "Val bpb difference per group of eval documents, each with its interval (Bonferroni over "
    "the groups): where the arm wins and where it loses.",
    "ladder": "The ladder: each arm minus the reference at every depth, with its 95% interval; the "
    "target depth (the experiment's model.depth) marked. A ranking that flips between depths shows as "
    "intervals on both sides of 0.",
    "curves": "Val bpb during training (the in-training eval sample), per seed and mean per arm.",
    "core_tasks": "Centred accuracy per CORE task per arm (0 = chance), 95% intervals.",
    "data": "What differs in the arms' data.",
}


def _inline(text: str) -> str:
    """Escaped text with markdown's `code` spans as <code> (the sections are written for both)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)) if len(parts) % 2 else html.escape(text)


def render_html(summary: Summary, figures: list[Path]) -> str:
    e = html.escape
    body = [
        f"<h1>{e(summary.experiment)}: comparison report</h1>",
        f"<p>Experiment fingerprint <code>{e(summary.fingerprint)}</code>.</p>",
    ]
    for sec in sections(summary):
        body.append(f"<h2>{e(sec.title)}</h2>")
        if sec.bullets:
            body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in sec.lines) + "</ul>")
        else:
            body += [f"<p>{_inline(x)}</p>" for x in sec.lines]
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
        cap = e(FIGURE_CAPTIONS.get(f.stem, f.stem))
        body.append(
            f'<figure><img alt="{e(f.stem)}" src="data:image/png;base64,{data}"><figcaption>{cap}</figcaption></figure>'
        )
    body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_inline(n)}</li>" for n in notes(summary)) + "</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "figure{margin:1.5em 0}figcaption{color:#444;font-size:0.9em;max-width:900px}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(summary.experiment)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(summary: Summary, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    figures = [
        p
        for p in (
            plot_differences(summary, out / "differences.png"),
            plot_final(summary, out / "final.png"),
            plot_groups(summary, out / "groups.png"),
            plot_ladder(summary, out / "ladder.png"),
            plot_curves(summary, out / "curves.png"),
            plot_core_tasks(summary, out / "core_tasks.png"),
            plot_data(summary, out / "data.png"),
        )
        if p is not None
    ]
    atomic_write_text(out / "summary.json", summary.to_json() + "\n")
    atomic_write_text(out / "report.md", render_markdown(summary, figures))
    atomic_write_text(out / "report.html", render_html(summary, figures))
    return [out / "summary.json", out / "report.md", out / "report.html", *figures]
