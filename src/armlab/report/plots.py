"""The report's figures (matplotlib, Agg backend: no display needed).

- curves.png: val bpb vs tokens per arm; each seed a thin line, the mean over seeds bold.
- final.png: final val bpb and CORE per arm, mean with 95% interval, seeds as dots.
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
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from armlab.workdir import atomic_path  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _colors(arms: list[str]) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {a: cycle[i % len(cycle)] for i, a in enumerate(arms)}


def plot_curves(summary: dict[str, Any], path: Path) -> Path | None:
    arms = summary["arms"]
    if not any(c for a in arms.values() for c in a["curves"].values()):
        return None
    colors = _colors(list(arms))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for arm, entry in arms.items():
        curves = [c for c in entry["curves"].values() if c]
        for c in curves:
            ax.plot([p[0] for p in c], [p[1] for p in c], color=colors[arm], lw=0.8, alpha=0.45)
        # mean over seeds at the token counts every seed evaluated at
        common = sorted(set.intersection(*(set(p[0] for p in c) for c in curves)))
        if common:
            per = [dict((p[0], p[1]) for p in c) for c in curves]
            mean = [sum(d[t] for d in per) / len(per) for t in common]
            ax.plot(common, mean, color=colors[arm], lw=2.4, label=f"{arm} (mean of {len(curves)})")
    ax.set_xlabel("tokens trained")
    cap = summary.get("train_eval_tokens")
    ax.set_ylabel(f"val bpb (first {cap:,} eval-set tokens)" if cap else "val bpb (shared eval set)")
    ax.set_title(f"{summary['experiment']}: validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _err(est: dict[str, Any]) -> list[list[float]] | None:
    """Asymmetric error bars (intervals are clipped to the metric's range, so not symmetric)."""
    if est["low"] is None:
        return None
    return [[est["estimate"] - est["low"]], [est["high"] - est["estimate"]]]


def _estimates(ax: Any, arms: dict[str, Any], key: str, colors: dict[str, str], title: str) -> None:
    """Mean with its 95% interval per arm, seeds as dots. CORE is drawn as bars from 0 (chance);
    val bpb as points on a zoomed axis, since bars on a cut axis would exaggerate differences."""
    names = [a for a in arms if arms[a].get(key)]
    for i, a in enumerate(names):
        est = arms[a][key]
        if key == "core":
            ax.bar(i, est["estimate"], color=colors[a], alpha=0.75, yerr=_err(est), capsize=6)
        else:
            ax.errorbar(i, est["estimate"], yerr=_err(est), fmt="o", color=colors[a], ms=9, capsize=8, lw=2)
        seeds = [r[key] for r in arms[a]["runs"] if r[key] is not None]
        ax.scatter([i + 0.12] * len(seeds), seeds, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if key == "core":
        ax.axhline(0, color="grey", lw=0.8)


def plot_final(summary: dict[str, Any], path: Path) -> Path:
    arms = summary["arms"]
    colors = _colors(list(arms))
    has_core = any(a.get("core") for a in arms.values())
    fig, axes = plt.subplots(1, 2 if has_core else 1, figsize=(8 if has_core else 4.5, 3.8), squeeze=False)
    _estimates(axes[0][0], arms, "val_bpb", colors, "final val bpb (lower is better)")
    if has_core:
        demo = " (demo tasks)" if (summary.get("bundle") or {}).get("demo") else ""
        _estimates(axes[0][1], arms, "core", colors, f"CORE{demo} (higher is better)")
    fig.suptitle("mean over seeds, 95% interval (seed + eval-item noise); dots are seeds", fontsize=9)
    return _save(fig, path)


def plot_core_tasks(summary: dict[str, Any], path: Path) -> Path | None:
    arms = summary["arms"]
    labels = sorted({t for a in arms.values() for t in a["core_tasks"]})
    if not labels:
        return None
    colors = _colors(list(arms))
    width = 0.8 / len(arms)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    for j, (arm, entry) in enumerate(arms.items()):
        xs = [i + (j - (len(arms) - 1) / 2) * width for i in range(len(labels))]
        ests = [entry["core_tasks"].get(t) for t in labels]
        lows = [e["estimate"] - e["low"] if e and e["low"] is not None else 0 for e in ests]
        highs = [e["high"] - e["estimate"] if e and e["low"] is not None else 0 for e in ests]
        ax.bar(
            xs,
            [e["estimate"] if e else 0 for e in ests],
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


def plot_data(summary: dict[str, Any], path: Path) -> Path | None:
    """Side-by-side panels of what differs in the arms' data (only panels with data are drawn)."""
    data = (summary.get("data") or {}).get("arms") or {}
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
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
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
                # plain numbers at 1, 2, 5 x 10^k: under a decade matplotlib's own log labels
                # either collide (2x10^2 3x10^2 ...) or leave a single tick
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=8))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                _zoom(
                    ax,
                    [
                        (d["sample"] or {}).get("doc_tokens") if panel == "doc_tokens" else d[panel]
                        for d in data.values()
                    ],
                )
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
    fig.suptitle(f"{summary['experiment']}: what differs in the data", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
