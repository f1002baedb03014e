"""The report's figures (matplotlib, Agg backend: no display needed).

- curves.png: val bpb vs tokens per arm; each seed a thin line, the mean over seeds bold.
- final.png: final val bpb and CORE per arm, mean with 95% interval, seeds as dots.
- core_tasks.png: centred accuracy per CORE task per arm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
    ax.set_ylabel("val bpb (shared eval set)")
    ax.set_title(f"{summary['experiment']}: validation bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _estimates(ax: Any, arms: dict[str, Any], key: str, colors: dict[str, str], title: str) -> None:
    """Mean with its 95% interval per arm, seeds as dots. CORE is drawn as bars from 0 (chance);
    val bpb as points on a zoomed axis, since bars on a cut axis would exaggerate differences."""
    names = [a for a in arms if arms[a].get(key)]
    for i, a in enumerate(names):
        est = arms[a][key]
        err = None if est["half_width"] is None else [[est["half_width"]], [est["half_width"]]]
        if key == "core":
            ax.bar(i, est["mean"], color=colors[a], alpha=0.75, yerr=err, capsize=6)
        else:
            ax.errorbar(i, est["mean"], yerr=err, fmt="o", color=colors[a], ms=9, capsize=8, lw=2)
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
    fig.suptitle("mean over seeds, 95% t interval; dots are seeds", fontsize=9)
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
        ax.bar(
            xs,
            [e["mean"] if e else 0 for e in ests],
            width,
            color=colors[arm],
            label=arm,
            yerr=[e["half_width"] or 0 if e else 0 for e in ests],
            capsize=3,
        )
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("centred accuracy (0 = chance)")
    ax.set_title("CORE tasks")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)
