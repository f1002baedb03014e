"""The three scorer backends on real models made here: a fastText classifier trained on the demo's
good vs junk documents scores as DCLM's enricher does; a random BERT classifier scored in
length-sorted batches gives each document what a plain one-at-a-time forward gives it; a head
scores what torch computes from the same weights; bad models and columns are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from armlab.data.score.backends import get_backend
from armlab.errors import ArmlabError
from armlab.spec import ScorerSpec
from score_util import demo_documents, head_reference, make_bert, make_head, train_fasttext


@pytest.fixture(scope="module")
def docs() -> tuple[list[str], list[str]]:
    return demo_documents(n_junk=60)


@pytest.fixture(scope="module")
def ft_model(tmp_path_factory: pytest.TempPathFactory, docs) -> Path:
    good, junk = docs
    return train_fasttext(tmp_path_factory.mktemp("ft") / "quality.bin", good[:300], junk)


def texts_table(texts: list[str | None]) -> pa.Table:
    return pa.table({"text": pa.array(texts, pa.string())})


def dclm_hq_prob(model, content: str) -> float:
    """DCLM's classify_fasttext_hq_prob (baselines/mappers/enrichers/
    quality_prediction_enrichers_calc_fasttext.py): the top label's probability, 1 - p for
    __label__cc. Through the binding, as fastText's own predict(text) calls it (+ "\\n")."""
    text = " ".join(content.strip().splitlines())
    (prob, label), = model.f.predict(text + "\n", 1, 0.0, "strict")  # fmt: skip
    return 1 - prob if label == "__label__cc" else prob


def test_fasttext_scores_as_dclm_and_separates_junk(ft_model, docs) -> None:
    import fasttext

    good, junk = docs
    test = good[300:400] + junk[:40] + ["line one\nline two\n\n  three  ", "", None]
    spec = ScorerSpec(name="ft", kind="fasttext", model=str(ft_model), label="__label__hq")
    scores = get_backend("fasttext").load(spec, ft_model, "cpu").score(texts_table(test))
    assert scores.dtype == np.float32 and np.isnan(scores[-1]) and not np.isnan(scores[:-1]).any()
    ref = fasttext.load_model(str(ft_model))
    want = np.array([dclm_hq_prob(ref, t) for t in test[:-1]])
    # fastText reports p + 1e-5 for every label, so P(hq) and DCLM's 1 - P(cc) differ by <= 2e-5 ...
    assert np.abs(scores[:-1] - want).max() <= 2.5e-5
    # ... and rank the documents the same (the only thing top / sample arms use)
    assert (np.argsort(scores[:-1], kind="stable") == np.argsort(want, kind="stable")).mean() > 0.98
    # DCLM's newline handling: a document scores as its lines joined by spaces
    joined = get_backend("fasttext").load(spec, ft_model, "cpu").score(texts_table(["line one line two three"]))
    assert scores[-3] == joined[0]
    # trained on good vs junk, it ranks held-out good documents above junk
    assert np.median(scores[:100]) > 0.5 > np.median(scores[100:140])


def test_fasttext_refuses_an_unknown_label_and_a_non_model(ft_model, tmp_path) -> None:
    spec = ScorerSpec(name="ft", kind="fasttext", model=str(ft_model), label="__label__good")
    with pytest.raises(ArmlabError, match=r"no label '__label__good' \(labels: __label__"):
        get_backend("fasttext").load(spec, ft_model, "cpu")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model" * 10)
    with pytest.raises(ArmlabError, match="not a fastText model"):
        get_backend("fasttext").load(spec, junk, "cpu")


def test_hf_length_sorted_batches_give_each_document_its_own_score(tmp_path, docs) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    good, junk = docs
    model_dir = make_bert(tmp_path / "bert", good + junk)
    # a long-tailed length mix, with documents truncated at max_length, an empty one and a null
    test = [t[: 40 * (1 + i % 7)] if i % 3 else t * 3 for i, t in enumerate(good[:40] + junk[:20])] + ["", None]
    spec = ScorerSpec(name="edu", kind="hf", model=str(model_dir), batch_size=7, max_length=64)
    got = get_backend("hf").load(spec, model_dir, "cpu").score(texts_table(test))
    assert np.isnan(got[-1]) and not np.isnan(got[:-1]).any()

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():  # one document at a time: no padding at all
        want = [ref(**tok(t, truncation=True, max_length=64, return_tensors="pt")).logits[0, 0].item() for t in test[:-1]]
    np.testing.assert_allclose(got[:-1], np.array(want, dtype=np.float32), rtol=0, atol=2e-5)


def test_hf_label_probability_and_refusals(tmp_path, docs) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    good, junk = docs
    model_dir = make_bert(tmp_path / "bert2", good + junk, num_labels=2)
    test = good[:5] + junk[:5]
    spec = ScorerSpec(name="q", kind="hf", model=str(model_dir), label="junk")
    got = get_backend("hf").load(spec, model_dir, "cpu").score(texts_table(test))
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        want = torch.softmax(ref(**tok(test, truncation=True, max_length=128, padding=True, return_tensors="pt")).logits, -1)[:, 1]
    np.testing.assert_allclose(got, want.numpy(), atol=2e-6)
    with pytest.raises(ArmlabError, match="has 2 labels, not one regression output; set label to one of good, junk"):
        get_backend("hf").load(ScorerSpec(name="q", kind="hf", model=str(model_dir)), model_dir, "cpu")
    with pytest.raises(ArmlabError, match="no label 'hq'"):
        get_backend("hf").load(ScorerSpec(name="q", kind="hf", model=str(model_dir), label="hq"), model_dir, "cpu")
    with pytest.raises(ArmlabError, match="not a sequence classifier"):
        get_backend("hf").load(ScorerSpec(name="q", kind="hf", model=str(tmp_path)), tmp_path, "cpu")


@pytest.mark.parametrize("name,hidden", [("head.safetensors", 5), ("head.npz", None)])
def test_head_scores_what_torch_computes(tmp_path, name, hidden) -> None:
    path = make_head(tmp_path / name, dim=6, hidden=hidden)
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 6)).astype(np.float32)
    rows = [None if i in (3, 17) else emb[i].tolist() for i in range(50)]
    table = pa.table({"embedding": pa.array(rows, pa.list_(pa.float32()))})
    spec = ScorerSpec(name="h", kind="head", model=str(path), column="embedding")
    got = get_backend("head").load(spec, path, "cpu").score(table)
    assert np.isnan(got[[3, 17]]).all()
    keep = np.array([i not in (3, 17) for i in range(50)])
    np.testing.assert_allclose(got[keep], head_reference(path, emb[keep]), rtol=1e-6, atol=1e-6)
    fixed = pa.table({"embedding": pa.array([r or [0.0] * 6 for r in rows], pa.list_(pa.float32(), 6))})
    assert np.isfinite(get_backend("head").load(spec, path, "cpu").score(fixed)).all()  # fixed_size_list too


def test_head_refuses_bad_embeddings_and_files(tmp_path) -> None:
    path = make_head(tmp_path / "h.safetensors", dim=4)
    spec = ScorerSpec(name="h", kind="head", model=str(path), column="embedding")
    model = get_backend("head").load(spec, path, "cpu")
    with pytest.raises(ArmlabError, match="row 1 has 3 values, the head takes 4"):
        model.score(pa.table({"embedding": [[1.0] * 4, [1.0] * 3]}))
    with pytest.raises(ArmlabError, match="has type string, not a list of floats"):
        model.score(pa.table({"embedding": ["a", "b"]}))
    three = make_head(tmp_path / "h3.npz", dim=4, outputs=3)
    with pytest.raises(ArmlabError, match="has 3 outputs; set label"):
        get_backend("head").load(spec, three, "cpu")
    labelled = ScorerSpec(name="h", kind="head", model=str(three), column="embedding", label="2")
    probs = get_backend("head").load(labelled, three, "cpu").score(pa.table({"embedding": [[0.5] * 4]}))
    assert 0 < probs[0] < 1
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(ArmlabError, match="not a .safetensors or .npz head"):
        get_backend("head").load(spec, bad, "cpu")
