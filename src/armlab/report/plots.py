"""The report's figures (matplotlib, Agg backend: no display needed).

- differences.png: the verdict's evidence: per metric, each arm minus the reference with its 95%
  interval (paired by seed), the per-seed differences as dots, 0 marked; an end cut at the
  metric's range drawn as an arrow.
- final.png: final val bpb and CORE per arm, mean with 95% interval, seeds as dots.
- groups.png: per group of eval documents (`[report] group_column`), each arm's val bpb
  difference from the reference with its (Bonferroni) interval.
- curves.png: val bpb vs tokens per arm; each seed a thin line (its own style and markers, so
  identical seeds do not hide each other), the mean over seeds bold.
- core_tasks.png: centred accuracy per CORE task per arm, with seed + item intervals.
- data.png: what differs in the data, side by side per arm: document length (chars, from the
  manifests' histograms), tokens per document (the compare-time sample), score distribution,
  the mix over the group column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: E402

from armlab.report.intervals import Interval  # noqa: E402
from armlab.report.summary import Summary  # noqa: E402
from armlab.report.verdict import METRICS  # noqa: E402
from armlab.workdir import atomic_path  # noqa: E402

SEED_STYLES = ["-", "--", ":", "-."]
SEED_MARKERS = ["o", "s", "^", "D", "v", "P"]
WIN, LOSE, NOISE = "#2a7d2a", "#b8322a", "#777777"


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _colors(arms: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def _coincident(curves: dict[str, list[tuple[float, float]]]) -> list[list[str]]:
    """Groups of runs whose curves are the same points (e.g. seeds that are one run repeated)."""
    seen: dict[tuple, list[str]] = {}
    for run, c in curves.items():
        if c:
            seen.setdefault(tuple(map(tuple, c)), []).append(run)
    return [runs for runs in seen.values() if len(runs) > 1]


def curves_ylabel(summary: Summary) -> str:
    """What the in-training val bpb covers: the first N tokens of the eval set, or all of it
    (the cap can be larger than the eval set: then it is the whole set, not N tokens)."""
    cap = summary.train_eval_tokens
    whole = next(iter(summary.arms.values())).eval.val_bpb_tokens
    if whole and cap >= whole:
        return f"val bpb (the whole eval set, {whole:,} tokens)"
    if whole:
        return f"val bpb (first {cap:,} of {whole:,} eval-set tokens)"
    return f"val bpb (at most the first {cap:,} eval-set tokens)"


def plot_curves(summary: Summary, path: Path) -> Path | None:
    fig = curves_figure(summary)
    return None if fig is None else _save(fig, path)


def curves_figure(summary: Summary) -> Any:
    arms = summary.arms
    if not any(c for a in arms.values() for c in a.curves.values()):
        return None
    colors = _colors(list(arms))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    same: list[list[str]] = []
    for arm, entry in arms.items():
        curves = {r: c for r, c in entry.curves.items() if c}
        for k, (run, c) in enumerate(curves.items()):
            # each seed its own dash and a hollow marker one size up from the previous seed's: two
            # seeds that coincide show as nested markers, not one (and the note below names them)
            ax.plot(
                [p[0] for p in c], [p[1] for p in c], color=colors[arm], lw=0.9, alpha=0.8, zorder=3,
                ls=SEED_STYLES[k % len(SEED_STYLES)], marker=SEED_MARKERS[k % len(SEED_MARKERS)],
                ms=4 + 2.5 * k, fillstyle="none", mew=1.1, label=f"{run}",
            )  # fmt: skip
        same += _coincident(curves)
        # mean over seeds at the token counts every seed evaluated at
        lists = list(curves.values())
        common = sorted(set.intersection(*(set(p[0] for p in c) for c in lists))) if lists else []
        if common:
            per = [dict((p[0], p[1]) for p in c) for c in lists]
            mean = [sum(d[t] for d in per) / len(per) for t in common]
            ax.plot(common, mean, color=colors[arm], lw=3, alpha=0.45, zorder=2, label=f"{arm} (mean of {len(lists)})")
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(curves_ylabel(summary))
    ax.set_title(f"{summary.experiment}: validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    if same:
        note = "; ".join(" = ".join(g) for g in same)
        fig.text(0.01, -0.02, f"identical curves (drawn on top of each other): {note}", fontsize=8, color=LOSE)
    return fig


def _err(iv: Interval) -> list[list[float]] | None:
    """Asymmetric error bars (intervals are clipped to the metric's range, so not symmetric)."""
    if iv.low is None or iv.high is None:
        return None
    return [[iv.estimate - iv.low], [iv.high - iv.estimate]]


def _clip_marks(ax: Any, x: float, iv: Interval, color: str) -> None:
    """An arrow head at an interval end cut at the metric's range: the interval goes on past it."""
    if iv.clipped_side in ("low", "both"):
        ax.plot([x], [iv.low], marker="v", color=color, ms=9, zorder=4)
    if iv.clipped_side in ("high", "both"):
        ax.plot([x], [iv.high], marker="^", color=color, ms=9, zorder=4)


def _estimates(ax: Any, summary: Summary, key: str, colors: dict[str, str], title: str) -> None:
    """Mean with its 95% interval per arm, seeds as dots. CORE is drawn as bars from 0 (chance);
    val bpb as points on a zoomed axis, since bars on a cut axis would exaggerate differences."""
    arms = summary.arms
    names = [a for a in arms if arms[a].interval(key) is not None]
    for i, a in enumerate(names):
        iv = arms[a].interval(key)
        if key == "core":
            ax.bar(i, iv.estimate, color=colors[a], alpha=0.75, yerr=_err(iv), capsize=6)
        else:
            ax.errorbar(i, iv.estimate, yerr=_err(iv), fmt="o", color=colors[a], ms=9, capsize=8, lw=2)
        _clip_marks(ax, i, iv, "black")
        seeds = [getattr(r, key) for r in arms[a].runs if getattr(r, key) is not None]
        ax.scatter([i + 0.12] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if key == "core":
        ax.axhline(0, color="grey", lw=0.8)


def plot_final(summary: Summary, path: Path) -> Path:
    colors = _colors(list(summary.arms))
    has_core = any(a.core for a in summary.arms.values())
    fig, axes = plt.subplots(1, 2 if has_core else 1, figsize=(8 if has_core else 4.5, 3.8), squeeze=False)
    _estimates(axes[0][0], summary, "val_bpb", colors, "final val bpb (lower is better)")
    if has_core:
        demo = " (demo tasks)" if (summary.bundle or {}).get("demo") else ""
        _estimates(axes[0][1], summary, "core", colors, f"CORE{demo} (higher is better)")
    fig.suptitle(
        "each arm alone: mean over seeds, 95% interval (seed + eval-item noise); dots are seeds\n"
        "the verdict is about the paired difference: see differences.png",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # the two-line title above the panels' own titles
    return _save(fig, path)


def _verdict_color(iv: Interval, lower_better: bool) -> str:
    if iv.low is None or iv.high is None or iv.low <= 0 <= iv.high:
        return NOISE
    return WIN if (iv.estimate < 0) == lower_better else LOSE


def _seed_differences(summary: Summary, arm: str, metric: str) -> list[float]:
    """Per-seed differences arm - reference on the seeds both ran (the paired design's points)."""
    ref = {r.seed: getattr(r, metric) for r in summary.arms[summary.reference_arm].runs}
    return [
        getattr(r, metric) - ref[r.seed]
        for r in summary.arms[arm].runs
        if r.seed in ref and getattr(r, metric) is not None and ref[r.seed] is not None
    ]


def _difference_rows(ax: Any, rows: list[tuple[str, Interval, list[float]]], lower_better: bool) -> None:
    """One horizontal interval per row (label, interval, per-seed dots), 0 marked."""
    for y, (_label, iv, dots) in enumerate(rows):
        color = _verdict_color(iv, lower_better)
        if iv.low is not None and iv.high is not None:
            ax.errorbar(
                iv.estimate, y, xerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], fmt="o",
                color=color, ms=8, capsize=6, lw=2,
            )  # fmt: skip
            if iv.clipped_side in ("low", "both"):
                ax.plot([iv.low], [y], marker="<", color=color, ms=9)
            if iv.clipped_side in ("high", "both"):
                ax.plot([iv.high], [y], marker=">", color=color, ms=9)
        else:
            ax.plot([iv.estimate], [y], marker="x", color=color, ms=9)
        if dots:
            ax.scatter(dots, [y + 0.18] * len(dots), color="black", s=10, zorder=3)
    ax.axvline(0, color="black", lw=0.9)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.grid(axis="x", alpha=0.3)


def plot_differences(summary: Summary, path: Path) -> Path | None:
    """Per metric a panel: each arm - reference with its 95% interval, per-seed differences as dots;
    green = better, red = worse, grey = within noise (the interval holds 0)."""
    metrics = [m for m in METRICS if any(c.metric == m for c in summary.comparisons)]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 1.4 + 0.55 * len(summary.arms)),
                             squeeze=False)  # fmt: skip
    for ax, metric in zip(axes[0], metrics, strict=True):
        label, lower_better = METRICS[metric]
        rows = [
            (f"{c.arm} - {c.reference}", c.interval, _seed_differences(summary, c.arm, metric))
            for c in summary.comparisons
            if c.metric == metric
        ]
        _difference_rows(ax, rows, lower_better)
        name = "CORE (demo tasks)" if metric == "core" and (summary.bundle or {}).get("demo") else label
        better = "left" if lower_better else "right"
        level = max(r[1].level for r in rows)
        ax.set_title(f"{name}: difference, {100 * level:.4g}% CI ({better} is better)", fontsize=10)
    fig.suptitle("paired difference from the reference arm (dots: per-seed differences)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_groups(summary: Summary, path: Path) -> Path | None:
    """Per group of eval documents, each arm's val bpb difference from the reference."""
    g = summary.groups
    if g is None or not g.groups:
        return None
    others = [a for a in summary.arms if a != summary.reference_arm]
    rows = [
        (f"{r.label} ({r.byte_share:.0%} of bytes)" + (f": {a}" if len(others) > 1 else ""), r.differences[a], [])
        for r in g.groups
        for a in others
        if a in r.differences
    ]
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.42 * len(rows)))
    _difference_rows(ax, rows[::-1], lower_better=True)
    ax.set_xlabel(f"val bpb, {' / '.join(others)} - {summary.reference_arm} (left is better)")
    ax.set_title(f"val bpb per {g.column}: {g.level:.1%} intervals (Bonferroni over {len(g.groups)} groups)", fontsize=10)
    return _save(fig, path)


def plot_ladder(summary: Summary, path: Path) -> Path | None:
    """Per metric a panel: arm - reference at each depth of the ladder, with its interval."""
    lad = summary.ladder
    if lad is None:
        return None
    metrics = [m for m in METRICS if any(m in r.differences for r in lad.rungs)]
    if not metrics:
        return None
    depths = [r.depth for r in lad.rungs]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        label, lower_better = METRICS[metric]
        others = list(dict.fromkeys(a for r in lad.rungs for a in r.differences.get(metric, {})))
        for j, arm in enumerate(others):
            off = (j - (len(others) - 1) / 2) * 0.12
            for x, r in enumerate(lad.rungs):
                iv = r.differences.get(metric, {}).get(arm)
                if iv is None or iv.low is None or iv.high is None:
                    continue
                color = _verdict_color(iv, lower_better)
                ax.errorbar(x + off, iv.estimate, yerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], fmt="o",
                            color=color, ms=7, capsize=5, lw=2, label=arm if x == 0 and len(others) > 1 else None)  # fmt: skip
            ys = [r.differences.get(metric, {}).get(arm) for r in lad.rungs]
            pts = [(x + off, iv.estimate) for x, iv in enumerate(ys) if iv is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color="grey", lw=0.8, alpha=0.6)
        ax.axhline(0, color="black", lw=0.9)
        ax.set_xticks(
            range(len(depths)),
            [f"d{r.depth}\n{_short(r.params)} params" + ("\n(target)" if r.depth == lad.target else "") for r in lad.rungs],
        )
        ax.set_xlim(-0.5, len(depths) - 0.5)
        better = "down" if lower_better else "up"
        who = others[0] if len(others) == 1 else "arm"
        ax.set_title(f"{label}: {who} - {lad.reference} by depth ({better} is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if len(others) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("ladder: the paired difference at each depth, 95% intervals", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_core_tasks(summary: Summary, path: Path) -> Path | None:
    arms = summary.arms
    labels = sorted({t for a in arms.values() for t in a.core_tasks})
    if not labels:
        return None
    colors = _colors(list(arms))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    for j, (arm, entry) in enumerate(arms.items()):
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(labels))]
        ests = [entry.core_tasks.get(t) for t in labels]
        lows = [e.estimate - e.low if e and e.low is not None else 0 for e in ests]
        highs = [e.high - e.estimate if e and e.high is not None else 0 for e in ests]
        ax.bar(
            xs,
            [e.estimate if e else 0 for e in ests],
            width,
            color=colors[arm],
            label=arm,
            yerr=[lows, highs],
            capsize=3,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("centred accuracy (0 = chance), 95% CI")
    ax.set_title("CORE tasks")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _step(ax: Any, edges: list[float], counts: list[int], color: str, label: str) -> None:
    """A histogram as a share-of-documents outline, so arms of different sizes compare."""
    total = max(sum(counts), 1)
    ax.stairs([c / total for c in counts], edges, color=color, lw=1.8, label=label)


def _zoom(ax: Any, hists: list[dict[str, Any] | None]) -> None:
    """Limit a log x axis to the bins that hold documents (fixed edges span 1 to 1e6)."""
    used = [(h["edges"][i], h["edges"][i + 1]) for h in hists if h for i, c in enumerate(h["counts"]) if c]
    if used:
        ax.set_xlim(max(min(a for a, _ in used), 1) / 1.5, max(b for _, b in used) * 1.5)


def _panel_hist(d: dict[str, Any], panel: str) -> dict[str, Any] | None:
    if panel == "doc_tokens":
        return (d["sample"] or {}).get("doc_tokens")
    if panel.startswith("scorer:"):
        return (d.get("scorers") or {}).get(panel.removeprefix("scorer:"))
    return d[panel]


def plot_data(summary: Summary, path: Path) -> Path | None:
    fig = data_figure(summary)
    return None if fig is None else _save(fig, path)


def data_figure(summary: Summary) -> Any:
    """Side-by-side panels of what differs in the arms' data (only panels with data are drawn)."""
    data = (summary.data or {}).get("arms") or {}
    if not data:
        return None
    colors = _colors(list(data))
    panels = []
    if any(d["doc_chars"] for d in data.values()):
        panels.append("doc_chars")
    if any((d["sample"] or {}).get("doc_tokens") for d in data.values()):
        panels.append("doc_tokens")
    if any(d["score"] for d in data.values()):
        panels.append("score")
    for name in dict.fromkeys(n for d in data.values() for n in d.get("scorers") or {}):
        panels.append(f"scorer:{name}")  # each scorer's score (`armlab score`)
    if any(d["groups"] for d in data.values()):
        panels.append("groups")
    if not panels:
        return None
    cols = min(2, len(panels))  # two panels a row: four in one row shrink to unreadable on a page
    rows = -(-len(panels) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    axes = [list(grid.flat)[: len(panels)]]
    for ax in list(grid.flat)[len(panels) :]:
        ax.set_visible(False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "groups":
            names = sorted(
                {k for d in data.values() for k in d["groups"] or {}},
                key=lambda k: -sum((d["groups"] or {}).get(k, 0) for d in data.values()),
            )[:10]
            width = 0.8 / len(data)
            for j, (arm, d) in enumerate(data.items()):
                g = d["groups"] or {}
                total = max(sum(g.values()), 1)
                xs = [i + (j - (len(data) - 1) / 2) * width for i in range(len(names))]
                ax.bar(xs, [g.get(k, 0) / total for k in names], width, color=colors[arm], label=arm)
            column = next(d["group_column"] for d in data.values() if d["groups"])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax.set_title(f"mix over {column}")
        else:
            for arm, d in data.items():
                h = _panel_hist(d, panel)
                if h:
                    _step(ax, h["edges"], h["counts"], colors[arm], arm)
            if panel in ("doc_chars", "doc_tokens"):
                ax.set_xscale("log")
                _zoom(ax, [_panel_hist(d, panel) for d in data.values()])
            column = next((d["score_column"] for d in data.values() if d["score"]), "score")
            ax.set_title(
                {
                    "doc_chars": "document length (chars)",
                    "doc_tokens": "tokens per document (sample)",
                    "score": f"{column} distribution",
                }.get(panel, f"scorer {panel.removeprefix('scorer:')} distribution")
            )
        ax.set_ylabel("share of documents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary.experiment}: what differs in the data", fontsize=10)
    fig.tight_layout()
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel in ("doc_chars", "doc_tokens"):
            _log_ticks(ax)
    return fig


def _short(v: float) -> str:
    """1 / 20 / 500 / 2k / 50k / 1M: tick labels that stay short on a log axis."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _log_ticks(ax: Any) -> None:
    """Labelled ticks at 1, 2, 5 x 10^k (or 1, 3 x, or 1 x 10^k on wider ranges), as many as the
    panel's width holds: matplotlib's own log labels either collide under a decade (2x10^2
    3x10^2 ...) or leave one tick, and "100,000" labels at 1-2-5 over five decades overlap."""
    lo, hi = ax.get_xlim()
    width_in = ax.get_position().width * ax.figure.get_figwidth()
    fits = max(2, int(width_in / 0.45))  # a short label and a gap are ~0.45 inch at this size
    for subs in ((1.0, 2.0, 5.0), (1.0, 3.0), (1.0,)):
        ticks = [m * 10**k for k in range(-1, 9) for m in subs if lo <= m * 10**k <= hi]
        if len(ticks) <= fits:
            break
    else:
        step = -(-len(ticks) // fits)
        ticks = ticks[::step]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
