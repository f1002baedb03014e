"""Runs of one arm that are one run in effect: identical loss curves, so never independent samples.

A seed is supposed to change the run (init and data order; with the nanochat engine only the data
order, through the file order of the run's base dir). When it changes nothing (nanochat reading a
one-file arm, two seeds whose file orders coincide, a patched trainer that ignores the seed) the
runs are copies: counted as independent seeds they would shrink the seed part of an interval to
exactly 0 and turn any difference into a verdict (issue 19: "better by 0.0001"). So runs of an arm
whose training losses agree at every logged step (to `TOL`, the precision nanochat prints) and whose
final val bpb agree are grouped; `compare` keeps the first of each group (lowest seed), names the
others and leaves them out.
"""

from __future__ import annotations

from armlab.runs import RunRecord

TOL = 1e-6  # nanochat logs its loss to 6 decimals


def _curve(r: RunRecord) -> list[tuple[int, float]]:
    return [(int(m["step"]), float(m["train_loss"])) for m in r.train_lines]


def _same(a: RunRecord, b: RunRecord) -> bool:
    ca, cb = _curve(a), _curve(b)
    if not ca or len(ca) != len(cb) or [s for s, _ in ca] != [s for s, _ in cb]:
        return False
    if any(abs(x - y) > TOL for (_, x), (_, y) in zip(ca, cb, strict=True)):
        return False
    va, vb = a.final_val_bpb, b.final_val_bpb
    return va is None or vb is None or abs(va - vb) <= TOL


def identical_groups(runs: list[RunRecord]) -> list[list[RunRecord]]:
    """Groups (of 2 or more, each sorted by seed) of runs whose loss curves are identical."""
    groups: list[list[RunRecord]] = []
    for r in sorted(runs, key=lambda r: r.seed):
        for g in groups:
            if _same(g[0], r):
                g.append(r)
                break
        else:
            groups.append([r])
    return [g for g in groups if len(g) > 1]
