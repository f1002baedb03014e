"""`kind = "fasttext"`: the probability a fastText classifier gives `label` (DCLM's quality filter).

Preprocessing is DCLM's (baselines/mappers/enrichers/quality_prediction_enrichers_calc_fasttext.py):
`" ".join(text.strip().splitlines())`, one line per document. The prediction goes straight to
the C++ binding, `model.f.predict(line + "\\n", -1, 0.0, "strict")`, which is exactly what
fastText's own `model.predict(line)` calls (it appends the "\\n" itself: the end-of-line token
counts), minus its numpy wrapper, which fails under numpy 2 ("Unable to avoid copy"); the
binding's `multilinePredict` returns wrong probabilities there and is not used.

k = -1 asks for every label, so the score is P(label) whichever label wins. DCLM asks for the
top label and takes 1 - p when it is `__label__cc`; fastText reports each probability as
p + 1e-5 (its log smoothing), so the two differ by at most 2e-5 and rank documents identically.
A null text has no score (NaN); an empty one is scored as fastText scores an empty line.
CPU only: one process per core (fastText predicts on one thread).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from armlab.data.score.backends import Hardware, cpu_count, nan_scores
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec, ScorerSpec

PREPROCESS = "dclm: ' '.join(text.strip().splitlines()) + '\\n'"


class FastTextBackend:
    kind = "fasttext"
    block_docs = 0

    def columns(self, scorer: ScorerSpec, pool: PoolSpec) -> list[str]:
        return [pool.text_column]

    def identity(self, scorer: ScorerSpec, pool: PoolSpec) -> dict[str, Any]:
        return {"label": scorer.label, "text_column": pool.text_column, "preprocess": PREPROCESS}

    def devices(self, requested: str | None, cluster: Hardware | None = None) -> tuple[str, int]:
        if requested == "cuda":
            raise ArmlabError("fastText scorers run on CPU only; drop --device cuda for them")
        return "cpu", cluster.cpus if cluster else cpu_count()

    def load(self, scorer: ScorerSpec, path: Path, device: str) -> FastTextModel:
        return FastTextModel(scorer, path)


class FastTextModel:
    def __init__(self, scorer: ScorerSpec, path: Path):
        import fasttext
        import fasttext.FastText

        fasttext.FastText.eprint = lambda *_a, **_k: (
            None
        )  # load_model's "does not return WordVectorModel" line
        try:
            model = fasttext.load_model(str(path))
        except ValueError as e:
            raise ArmlabError(f"scorer {scorer.name!r}: {path} is not a fastText model ({e})") from None
        self.f, labels = model.f, list(model.labels)
        if scorer.label not in labels:
            raise ArmlabError(
                f"scorer {scorer.name!r}: the model has no label {scorer.label!r} (labels: {', '.join(labels[:10])})"
            )
        self.label = scorer.label

    def score(self, table: pa.Table) -> np.ndarray:
        texts = table.column(0).to_pylist()
        out = nan_scores(len(texts))
        predict, label = self.f.predict, self.label
        for i, text in enumerate(texts):
            if text is None:
                continue
            for p, lab in predict(" ".join(text.strip().splitlines()) + "\n", -1, 0.0, "strict"):
                if lab == label:
                    out[i] = p
                    break
        return out
