"""The report files: report.md, a self-contained report.html (figures base64-embedded), the
figures themselves and summary.json. Markdown and HTML are rendered from the same tables."""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from armlab.report.plots import plot_core_tasks, plot_curves, plot_final
from armlab.workdir import atomic_write_json, atomic_write_text


def _est(e: dict[str, Any] | None, digits: int = 4) -> str:
    if not e:
        return "-"
    if e["half_width"] is None:
        return f"{e['mean']:.{digits}f}"
    return f"{e['mean']:.{digits}f} ± {e['half_width']:.{digits}f}"


def _tokens(e: dict[str, Any] | None) -> str:
    if not e:
        return "-"
    t = e["mean"]
    return f"{t / 1e9:.2f}B" if t >= 1e9 else f"{t / 1e6:.2f}M" if t >= 1e6 else f"{t:,.0f}"


def _duration(e: dict[str, Any] | None) -> str:
    if not e:
        return "-"
    s = e["mean"]
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table in the report."""
    demo = (summary.get("bundle") or {}).get("demo")
    core_name = "CORE (demo tasks)" if demo else "CORE"
    arms = summary["arms"]
    out = [
        (
            "Arms (mean ± 95% CI over seeds)",
            [
                "arm",
                "kind",
                "seeds",
                "final val bpb",
                core_name,
                "tokens trained",
                "epochs over its data",
                "training time",
            ],
            [
                [
                    a,
                    e["kind"],
                    ",".join(str(r["seed"]) for r in e["runs"]),
                    _est(e["val_bpb"]),
                    _est(e["core"]),
                    _tokens(e["tokens"]),
                    _est(e["epoch"], 2),
                    _duration(e["train_time_s"]),
                ]
                for a, e in arms.items()
            ],
        )
    ]
    runs = [
        [
            a,
            r["run"],
            str(r["seed"]),
            "-" if r["val_bpb"] is None else f"{r['val_bpb']:.4f}",
            "-" if r["core"] is None else f"{r['core']:.4f}",
            "-" if r["tokens"] is None else f"{r['tokens']:,}",
        ]
        for a, e in arms.items()
        for r in e["runs"]
    ]
    out.append(("Runs", ["arm", "run", "seed", "final val bpb", core_name, "tokens"], runs))
    labels = sorted({t for e in arms.values() for t in e["core_tasks"]})
    if labels:
        out.append(
            (
                f"{core_name}: centred accuracy per task",
                ["task", *arms],
                [[t, *(_est(e["core_tasks"].get(t)) for e in arms.values())] for t in labels],
            )
        )
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _notes(summary: dict[str, Any]) -> list[str]:
    notes = list(summary.get("notes", []))
    b = summary.get("bundle")
    if b and b.get("demo"):
        notes.append(
            "CORE here is computed on armlab demo's own small tasks (built from held-out eval documents) "
            "through the real CORE code, not on DCLM's 22 tasks; it shows the plumbing, not a benchmark."
        )
    elif b:
        notes.append(
            f"CORE bundle: {b.get('name')} ({len(b.get('tasks', []))} tasks, sha256 {b.get('sha256')})."
        )
    notes.append(
        f"Differences are against the reference arm `{summary['reference_arm']}`; 95% intervals use the "
        "t distribution, paired by seed when both arms ran the same seeds, else Welch."
    )
    for x in summary["excluded"]:
        notes.append(f"Excluded run `{x['run']}` (arm {x['arm']}): state {x['state']}.")
    return notes


def render_markdown(summary: dict[str, Any], figures: list[Path]) -> str:
    parts = [
        f"# {summary['experiment']}: comparison report",
        "",
        f"Experiment fingerprint `{summary['fingerprint']}`; generated {time.strftime('%Y-%m-%d %H:%M', time.localtime(summary['created']))}.",
        "",
    ]
    if summary["comparisons"]:
        parts += ["## Verdict", ""] + [f"- {c['verdict']}" for c in summary["comparisons"]] + [""]
    for title, header, rows in tables(summary):
        parts += [f"## {title}", "", _md_table(header, rows), ""]
    parts += ["## Figures", ""] + [f"![{f.stem}]({f.name})" for f in figures] + [""]
    parts += ["## Notes", ""] + [f"- {n}" for n in _notes(summary)] + [""]
    return "\n".join(parts)


def render_html(summary: dict[str, Any], figures: list[Path]) -> str:
    e = html.escape
    body = [
        f"<h1>{e(summary['experiment'])}: comparison report</h1>",
        f"<p>Experiment fingerprint <code>{e(summary['fingerprint'])}</code>.</p>",
    ]
    if summary["comparisons"]:
        body.append(
            "<h2>Verdict</h2><ul>"
            + "".join(f"<li>{e(c['verdict'])}</li>" for c in summary["comparisons"])
            + "</ul>"
        )
    for title, header, rows in tables(summary):
        body.append(
            f"<h2>{e(title)}</h2><table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header)
            + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
            + "</table>"
        )
    body.append("<h2>Figures</h2>")
    for f in figures:
        data = base64.b64encode(f.read_bytes()).decode()
        body.append(f'<p><img alt="{e(f.stem)}" src="data:image/png;base64,{data}"></p>')
    body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in _notes(summary)) + "</ul>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
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
        )
        if p is not None
    ]
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_markdown(summary, figures))
    atomic_write_text(out / "report.html", render_html(summary, figures))
    return [out / "summary.json", out / "report.md", out / "report.html", *figures]
