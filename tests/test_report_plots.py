"""The report's figures: labels that do not collide, axis labels that say what was measured,
curves that do not hide each other (issue 20's figure faults, each reproduced first)."""

from __future__ import annotations

import numpy as np

from armlab.data.prepare.stats import DOC_CHARS_EDGES
from armlab.report.plots import curves_figure, data_figure
from report_util import make_summary


def _overlaps(ax) -> list[tuple[str, str]]:
    """Pairs of neighbouring x tick labels whose drawn boxes overlap."""
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
    boxes = sorted(((t.get_window_extent(renderer), t.get_text()) for t in labels), key=lambda b: b[0].x0)
    return [(a[1], b[1]) for a, b in zip(boxes, boxes[1:], strict=False) if a[0].x1 > b[0].x0]


def test_data_png_length_ticks_do_not_overlap_over_five_decades() -> None:
    # Before: 1-2-5 ticks labelled "100,000" over 20 to 500,000 chars collided in a 4-inch panel.
    counts = [0] * (len(DOC_CHARS_EDGES) - 1)
    for i, e in enumerate(DOC_CHARS_EDGES[:-1]):
        if 20 <= e <= 500_000:
            counts[i] = 100 + i
    arm = {
        "docs": sum(counts), "chars": 10**9, "tokens": None, "tokens_exact": False,
        "doc_chars": {"edges": DOC_CHARS_EDGES, "counts": counts}, "score": None, "score_column": None,
        "groups": {"a": 3, "b": 1}, "group_column": "source", "overlap": {}, "sample": None,
    }  # fmt: skip
    fig = data_figure(make_summary(data={"arms": {"top": arm, "random": arm}}))
    ax = fig.axes[0]
    assert ax.get_title() == "document length (chars)"
    ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) >= 3 and "100k" in ticks, ticks
    assert not _overlaps(ax)


def test_curves_ylabel_never_names_more_tokens_than_the_eval_set() -> None:
    # Before: "val bpb (first 20,971,520 eval-set tokens)" on an eval set of 50,000 tokens.
    curve = {"top": {"top-s0": [(0.0, 5.0), (100.0, 4.0)]}}
    ax = curves_figure(make_summary(curves=curve, train_eval_tokens=20_971_520, val_bpb_tokens=50_000)).axes[0]
    assert ax.get_ylabel() == "val bpb (the whole eval set, 50,000 tokens)"
    ax = curves_figure(make_summary(curves=curve, train_eval_tokens=8192, val_bpb_tokens=50_000)).axes[0]
    assert ax.get_ylabel() == "val bpb (first 8,192 of 50,000 eval-set tokens)"


def test_identical_curves_are_drawn_apart_and_named() -> None:
    # Before: two seeds with the same curve drew one line over the other: one seed seemed missing.
    same = [(float(t), 5.0 - t / 100) for t in range(0, 400, 100)]
    curves = {"top": {"top-s0": same, "top-s1": list(same)}, "random": {"random-s0": [(0.0, 5.1), (300.0, 2.2)]}}
    fig = curves_figure(make_summary(curves=curves))
    seeds = [ln for ln in fig.axes[0].get_lines() if ln.get_label() in ("top-s0", "top-s1")]
    assert len(seeds) == 2
    a, b = seeds
    assert np.array_equal(a.get_ydata(), b.get_ydata())
    assert (a.get_linestyle(), a.get_marker(), a.get_markersize()) != (b.get_linestyle(), b.get_marker(), b.get_markersize())
    notes = [t.get_text() for t in fig.texts]
    assert any("identical curves" in t and "top-s0 = top-s1" in t for t in notes), notes
