"""The demo with a model as the selection method: its top arm is the 40% of the pool a fastText
classifier scores most likely to be good text (DCLM's way), against a uniform 40%.

    python examples/demo_fasttext.py            # ~/.cache/armlab/demo-fasttext (a few minutes on CPU)
    python examples/demo_fasttext.py --workdir DIR --num-iterations 60

The pool is `armlab demo`'s (the standard library's docstrings plus 20% synthetic junk, built here
if `armlab demo` has not built it). The classifier is trained here, DCLM-style (`__label__hq` vs
`__label__cc`, word bigrams), on 2,000 of the pool's documents labelled by where they came from
(`source`: stdlib prose vs the three kinds of junk); it never sees the heuristic `score` column.
Then the experiment runs through the real commands' code: `armlab score` (the classifier over
every pool document, into keyed sidecars), `armlab prepare` (the top arm selected on those
scores), the tokenizer, two seeds of each arm, evaluation (val bpb, and CORE on the demo's own
tasks) and `armlab compare`, whose data section shows each arm's distribution of the score.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow.parquet as pq

from armlab.demo import demo_experiment
from armlab.spec import parse_experiment

TRAIN_DOCS = 2000


def train_classifier(pool: Path, out: Path, seed: int = 0) -> Path:
    """fastText on TRAIN_DOCS pool documents: stdlib prose -> __label__hq, junk -> __label__cc."""
    import fasttext

    rows = [
        (src, text)
        for f in sorted(pool.glob("*.parquet"))
        for src, text in zip(*pq.read_table(f, columns=["source", "text"]).to_pydict().values(), strict=True)
    ]
    rng = random.Random(seed)
    rng.shuffle(rows)
    train = out.with_suffix(".train.txt")
    with open(train, "w", encoding="utf-8") as f:
        for src, text in rows[:TRAIN_DOCS]:
            label = "__label__hq" if src == "stdlib" else "__label__cc"
            f.write(f"{label} {' '.join(text.split())}\n")  # fastText reads one document a line
    model = fasttext.train_supervised(
        str(train), epoch=10, lr=0.5, wordNgrams=2, dim=32, minCount=1, bucket=200_000, thread=1, seed=seed,
        verbose=0,
    )
    model.save_model(str(out))
    train.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("~/.cache/armlab/demo-fasttext"))
    ap.add_argument("--pool", type=Path, default=Path("~/.cache/armlab/armlab-demo/pool"))
    ap.add_argument("--num-iterations", type=int, default=120)
    args = ap.parse_args()

    from armlab.data.prepare import prepare
    from armlab.data.score.run import score
    from armlab.demo.pool import build_pool
    from armlab.demo.tasks import build_demo_bundle
    from armlab.ops.orchestrator import local_host, run_here
    from armlab.pipeline import evaluate_experiment
    from armlab.report.compare import compare, print_verdict
    from armlab.tokenizer import train_experiment_tokenizer
    from armlab.workdir import open_workdir

    root, pool = args.workdir.expanduser().resolve(), args.pool.expanduser().resolve()
    build_pool(pool)  # the demo's pool, reused when complete
    model = root / "quality.bin"
    if not model.is_file():
        root.mkdir(parents=True, exist_ok=True)
        train_classifier(pool, model)

    data = demo_experiment(root, args.num_iterations).model_dump(mode="json", exclude_none=True)
    data["name"] = "demo-fasttext"
    data["pool"]["uri"] = str(pool / "*.parquet")
    data["scorers"] = [{"name": "ft", "kind": "fasttext", "model": str(model), "label": "__label__hq"}]
    data["arms"] = [
        {"name": "ft-top40", "kind": "top", "ratio": 0.4, "score": "ft"},
        {"name": "random40", "kind": "random", "ratio": 0.4, "seed": 1},
    ]
    exp = parse_experiment(data, "examples/demo_fasttext.py")

    score(exp)
    prepare(exp)
    train_experiment_tokenizer(exp)
    build_demo_bundle(open_workdir(exp, create=False).eval_dir, root / "demo_bundle")
    _, failures = run_here(exp, local_host(exp, [a.name for a in exp.arms], device="cpu"), exp.train.seeds)
    if failures:
        raise SystemExit("; ".join(failures))
    evaluate_experiment(exp, device="cpu")
    out, summary = compare(
        exp,
        notes=[
            "Demo pool (armlab demo's): stdlib docstrings (good text) plus 20% synthetic junk. `ft-top40` keeps the "
            f"40% of the pool a fastText classifier (trained on {TRAIN_DOCS:,} pool documents labelled by source, "
            "stdlib vs junk) scores most likely `__label__hq`; `random40` is a uniform 40%.",
            "The eval set is held out of the same pool, so about a fifth of it is junk: val bpb rewards an arm that "
            "learned to predict junk too, while the demo CORE tasks are built from the held-out prose only.",
        ],
    )
    print_verdict(summary)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
