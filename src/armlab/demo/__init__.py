"""`armlab demo`: the whole experiment on a laptop CPU in a few minutes, with no network.

Builds a pool from the standard library's docstrings plus synthetic junk (`demo.pool`), then runs
a `top` (by quality score) vs `random` arm experiment, 2 seeds each, with a tiny tokenizer and
model through the real code paths: prepare -> tokenizer -> train -> evaluate (val bpb + CORE on
the demo's own task bundle, `demo.tasks`) -> compare. A rerun reuses everything complete.
"""

from __future__ import annotations

import time
from pathlib import Path

from armlab.progress import console
from armlab.spec import Experiment, parse_experiment

DEFAULT_WORKDIR = "~/.cache/armlab/armlab-demo"


def demo_experiment(workdir: Path, num_iterations: int = 120) -> Experiment:
    """The demo's experiment file, as data (it is frozen to <workdir>/experiment.toml like any other)."""
    return parse_experiment(
        {
            "name": "armlab-demo",
            "workdir": str(workdir),
            "pool": {"uri": str(workdir / "pool" / "*.parquet"), "text_column": "text"},
            "eval": {"docs": 400, "seed": 0},
            "tokenizer": {"vocab_size": 512, "train_chars": 1_000_000},
            "shards": {"rows_per_shard": 256, "row_group_rows": 64},
            "arms": [
                {"name": "top40", "kind": "top", "ratio": 0.4, "score_column": "score"},
                {"name": "random40", "kind": "random", "ratio": 0.4, "seed": 1},
            ],
            # d2, width 128 (2 heads of 64), ~0.6M parameters; a 256-token context holds a whole demo
            # document (<= 700 chars), so the loader's packing crops little of it
            "model": {"depth": 2, "max_seq_len": 256, "aspect_ratio": 64, "head_dim": 64},
            "train": {
                "device_batch_size": 4,
                "total_batch_size": 1024,
                "num_iterations": num_iterations,
                "seeds": [0, 1],
                "eval_every": 40,
                "eval_tokens": 8192,
                "save_every": 120,
                "compile": False,
                "allow_repeat": True,  # the pool's size depends on the Python version's stdlib; never refuse the demo
            },
            "evaluate": {"core_bundle": str(workdir / "demo_bundle")},
            # each arm's mix of the pool's sources (stdlib prose vs the three kinds of junk) in the report
            "report": {"group_column": "source"},
        },
        source="armlab demo",
    )


def run_demo(workdir: str | Path | None = None, device: str = "cpu", num_iterations: int = 120) -> Path:
    """Run (or finish) the demo; returns the report dir. Fewer steps give a quicker, noisier look."""
    from armlab.data.prepare import prepare
    from armlab.demo.pool import build_pool
    from armlab.demo.tasks import build_demo_bundle
    from armlab.errors import RunFailed
    from armlab.ops.orchestrator import local_host, run_here
    from armlab.pipeline import check_runs_match, evaluate_experiment
    from armlab.report.compare import compare, print_verdict
    from armlab.tokenizer import train_experiment_tokenizer
    from armlab.workdir import open_workdir

    t0 = time.time()
    root = Path(workdir or DEFAULT_WORKDIR).expanduser().resolve()
    exp = demo_experiment(root, num_iterations)
    wd = open_workdir(exp, create=False)  # another experiment's workdir: refused, nothing written
    check_runs_match(exp, [a.name for a in exp.arms], exp.train.seeds)  # another --num-iterations
    build_pool(root / "pool")
    prepare(exp)
    train_experiment_tokenizer(exp)
    build_demo_bundle(wd.eval_dir, root / "demo_bundle")
    host = local_host(exp, [a.name for a in exp.arms], device=device)
    _, failures = run_here(exp, host, exp.train.seeds)  # prepare and tokenizer: up to date by now
    if failures:
        raise RunFailed("; ".join(failures))
    evaluate_experiment(exp, device=device)
    out, summary = compare(
        exp,
        notes=[
            "Demo pool: docstrings of Python's standard library and its language reference (good text) plus 20% "
            "synthetic junk (word salad, repeated boilerplate, keyword spam); score = min(1, stopword share / 0.25) "
            "x distinct word-trigram share. `top40` keeps the 40% best-scored documents, `random40` a uniform 40%.",
            "The eval set is held out of the same pool, so about a fifth of it is junk: val bpb rewards an arm that "
            "learned to predict junk too, while the demo CORE tasks are built from the held-out prose only.",
        ],
    )
    console.print(f"demo: done in {time.time() - t0:.0f}s")
    print_verdict(summary)
    print(f"report: {out / 'report.html'}\n        {out / 'report.md'}\nsummary: {out / 'summary.json'}")
    return out
