"""CORE on a tiny bundle of DCLM's format, with a model whose next-token distribution we set by hand.

The model is a fixed bigram table: the logits at a position are log P[current token], so every
continuation loss is a sum of -ln P entries that the comments below work out by hand.
"""

from __future__ import annotations

import json
import math
import random
import zipfile
from pathlib import Path

import pytest
import torch

from armlab.errors import ArmlabError
from armlab.evaluate.bundle import load_bundle, write_bundle
from armlab.evaluate.core import centered, evaluate_core, render_lm, render_mc, render_schema, task_items

VOCAB = {"a": 1, "b": 2, " ": 3, "\n": 3, "q": 4, "x": 5}  # 0 is BOS; a newline reads as a space
# Next-token probabilities over [bos, a, b, ' ', q, x].
DEFAULT_ROW = [1 / 32, 1 / 2, 1 / 4, 1 / 8, 1 / 16, 1 / 32]
AFTER_B = [1 / 32, 1 / 4, 1 / 8, 1 / 2, 1 / 16, 1 / 32]  # after 'b', a space is likely


class CharTokenizer:
    bos_id = 0
    token_bytes = [0, 1, 1, 1, 1, 1]  # every character token is one byte; BOS none

    def encode(self, texts: list[str], prepend_bos: bool = True) -> list[list[int]]:
        return [([self.bos_id] if prepend_bos else []) + [VOCAB[c] for c in t] for t in texts]


class Bigram(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        table = torch.tensor([DEFAULT_ROW] * 6).log()
        table[VOCAB["b"]] = torch.tensor(AFTER_B).log()
        self.register_buffer("table", table)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]


def tiny_tasks() -> list[dict]:
    return [
        {  # choices "a", "b", "ab" after "q ": mean losses ln2=0.693, ln4=1.386, (ln2+ln4)/2=1.040 -> always 0
            "label": "mc",
            "icl_task_type": "multiple_choice",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 100 / 3,
            "items": [
                {"query": q, "choices": ["a", "b", "ab"], "gold": g}
                for q, g in [("q", 0), ("x", 1), ("qq", 0), ("xq", 2)]
            ],  # 2 of 4 correct
        },
        {  # contexts "a" / "b", continuation " a": spans [' ', 'a'] -> option a: (ln8 + ln2)/2 = 1.386,
            # option b: (ln2 + ln2)/2 = 0.693 -> always option 1
            "label": "schema",
            "icl_task_type": "schema",
            "num_fewshot": 0,
            "continuation_delimiter": " ",
            "random_baseline": 50,
            "items": [
                {"context_options": ["a", "b"], "continuation": "a", "gold": 1},
                {"context_options": ["a", "b"], "continuation": "a", "gold": 0},
            ],  # 1 of 2 correct
        },
        {  # greedy argmax is 'a' after every token here: "aa" and "a" match exactly, "ab" and "b" do not
            "label": "lm",
            "icl_task_type": "language_modeling",
            "num_fewshot": 0,
            "continuation_delimiter": "",
            "random_baseline": 0,
            "items": [{"context": "q", "continuation": c} for c in ["aa", "ab", "a", "b"]],  # 2 of 4 correct
        },
    ]


def test_scores_equal_hand_computation(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", tiny_tasks()))
    out = evaluate_core(Bigram(), CharTokenizer(), bundle)
    t = out.tasks
    assert t["mc"].accuracy == pytest.approx(0.5)
    assert t["schema"].accuracy == pytest.approx(0.5)
    assert t["lm"].accuracy == pytest.approx(0.5)
    # centring: (acc - 0.01 b) / (1 - 0.01 b)
    assert t["mc"].centered == pytest.approx((0.5 - 1 / 3) / (1 - 1 / 3))  # 0.25
    assert t["schema"].centered == pytest.approx(0.0)
    assert t["lm"].centered == pytest.approx(0.5)
    assert out.core == pytest.approx((0.25 + 0.0 + 0.5) / 3)
    assert [t[k].n for k in ("mc", "schema", "lm")] == [4, 2, 4]
    assert out.bundle["sha256"] == bundle.sha256


def test_continuous_scores_equal_hand_computation(tmp_path: Path) -> None:
    """Log-prob of the correct continuation (nats, and its bytes) and the per-byte margin over the
    best wrong option, worked out from the bigram table (ln2 units: 1/2 -> 1, 1/4 -> 2, 1/8 -> 3)."""
    bundle = load_bundle(write_bundle(tmp_path / "b", tiny_tasks()))
    t = evaluate_core(Bigram(), CharTokenizer(), bundle).tasks
    ln2 = math.log(2)

    def by_item(label: str, key: str, want: dict) -> list:  # items come in the task's shuffled order
        task = next(x for x in bundle.tasks if x.label == label)
        return [want[str(item[key])] for item in task_items(bundle, task, None)]

    # mc: after "q " the options cost a: 1 bit (1 byte), b: 2 bits, ab: 1 + 2 bits over 2 bytes
    # -> bits/byte a -1, b -2, ab -1.5; golds a, b, a, ab -> margins +0.5, -1, +0.5, -0.5
    mc = {"q": (-ln2, 1, 0.5), "x": (-2 * ln2, 1, -1.0), "qq": (-ln2, 1, 0.5), "xq": (-3 * ln2, 2, -0.5)}
    want = by_item("mc", "query", mc)
    assert t["mc"].logprob == pytest.approx([w[0] for w in want]) and t["mc"].bytes == [w[1] for w in want]
    assert t["mc"].margin == pytest.approx([w[2] for w in want])
    assert t["mc"].logprob_per_byte == pytest.approx(-7 / 5)  # pooled: 7 bits over 5 bytes
    # schema: span " a" after context a: 3 + 1 bits, after b: 1 + 1 bits (2 bytes each)
    want = by_item("schema", "gold", {"1": (-2 * ln2, 1.0), "0": (-4 * ln2, -1.0)})
    assert t["schema"].logprob == pytest.approx([w[0] for w in want])
    assert t["schema"].margin == pytest.approx([w[1] for w in want])
    # lm: "aa" 2 bits, "ab" 3 bits (2 bytes each), "a" 1 bit, "b" 2 bits (1 byte each); no margin
    lm = {"aa": (-2 * ln2, 2), "ab": (-3 * ln2, 2), "a": (-ln2, 1), "b": (-2 * ln2, 1)}
    want = by_item("lm", "continuation", lm)
    assert t["lm"].logprob == pytest.approx([w[0] for w in want]) and t["lm"].bytes == [w[1] for w in want]
    assert t["lm"].margin is None
    out = evaluate_core(Bigram(), CharTokenizer(), load_bundle(write_bundle(tmp_path / "c", tiny_tasks())))
    assert out.core_lp == pytest.approx((-7 / 5 - 6 / 4 - 8 / 6) / 3)
    assert out.core_margin == pytest.approx((-0.125 + 0.0) / 2)  # mc and schema only


def test_centering_formula() -> None:
    assert centered(0.25, 25) == pytest.approx(0.0)
    assert centered(1.0, 25) == pytest.approx(1.0)
    assert centered(0.625, 25) == pytest.approx((0.625 - 0.25) / 0.75)
    assert centered(0.1, 20) < 0  # below chance is negative


def test_max_per_task_and_crop(tmp_path: Path) -> None:
    bundle = load_bundle(write_bundle(tmp_path / "b", tiny_tasks()))
    out = evaluate_core(Bigram(), CharTokenizer(), bundle, max_per_task=1)
    assert all(t.n == 1 for t in out.tasks.values())
    # A context longer than the model's window is cropped from the left; the answer is unchanged.
    long = [
        {
            "label": "lm",
            "icl_task_type": "language_modeling",
            "num_fewshot": 0,
            "continuation_delimiter": "",
            "random_baseline": 0,
            "items": [{"context": "q" * 50, "continuation": "aa"}],
        }
    ]
    out = evaluate_core(Bigram(), CharTokenizer(), load_bundle(write_bundle(tmp_path / "c", long)), max_len=8)
    assert out.tasks["lm"].accuracy == 1.0


def test_fewshot_prompts_follow_the_recipe() -> None:
    shots = [{"query": "Q1", "choices": ["x", "y"], "gold": 1}]
    assert render_mc({"query": "Q", "choices": ["a", "b"]}, ": ", shots) == ["Q1: y\n\nQ: a", "Q1: y\n\nQ: b"]
    sshots = [{"context_options": ["c0", "c1"], "continuation": "k", "gold": 0}]
    assert render_schema({"context_options": ["A", "B"], "continuation": "z"}, " ", sshots) == [
        "c0 k\n\nA z",
        "c0 k\n\nB z",
    ]
    lshots = [{"context": " ctx ", "continuation": "ans"}]
    assert render_lm({"context": "Q? ", "continuation": "A"}, " ", lshots) == [
        "ctx ans\n\nQ?",
        "ctx ans\n\nQ? A",
    ]


def test_fewshot_examples_are_seeded_and_exclude_the_item(tmp_path: Path) -> None:
    # 3-shot over 5 items: every item's prompt carries 3 other items' answers, the same on every run.
    items = [{"query": f"q{'q' * i}", "choices": ["a", "b"], "gold": 0} for i in range(5)]
    task = {
        "label": "mc",
        "icl_task_type": "multiple_choice",
        "num_fewshot": 3,
        "continuation_delimiter": " ",
        "random_baseline": 50,
        "items": items,
    }
    bundle = load_bundle(write_bundle(tmp_path / "b", [task]))
    a = evaluate_core(Bigram(), CharTokenizer(), bundle)
    b = evaluate_core(Bigram(), CharTokenizer(), bundle)
    assert a.tasks == b.tasks
    rng = random.Random(1234 + 2)
    chosen = rng.sample([0, 1, 3, 4], 3)
    assert 2 not in chosen and len(set(chosen)) == 3


def test_bundle_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ArmlabError, match="not found"):
        load_bundle(tmp_path / "nope")
    root = write_bundle(tmp_path / "b", tiny_tasks())
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,33.3\n")
    with pytest.raises(ArmlabError, match=r"eval_meta_data\.csv: no 'Random baseline' row for task 'schema'"):
        load_bundle(root)
    root = write_bundle(tmp_path / "c", tiny_tasks())
    (root / "core.yaml").write_text("icl_tasks: [ {label: mc\n")
    with pytest.raises(ArmlabError, match=r"core\.yaml: invalid YAML"):
        load_bundle(root)
    root = write_bundle(tmp_path / "d", tiny_tasks())
    (root / "eval_data" / "lm.jsonl").write_text('{"context": "q"}\n')
    bundle = load_bundle(root)
    with pytest.raises(ArmlabError, match=r"lm\.jsonl:1: language_modeling item lacks continuation"):
        evaluate_core(Bigram(), CharTokenizer(), bundle)
    (root / "eval_data" / "lm.jsonl").unlink()
    with pytest.raises(ArmlabError, match=r"lm\.jsonl: data file of task 'lm' is missing"):
        load_bundle(root)


def test_bundle_from_url_is_downloaded_once_and_checksummed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    root = write_bundle(tmp_path / "src" / "eval_bundle", tiny_tasks())
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:  # like nanochat's eval_bundle.zip: one top-level dir
        for p in root.rglob("*"):
            z.write(p, p.relative_to(root.parent))
    url = archive.as_uri()
    with pytest.raises(ArmlabError, match="sha256 is"):
        load_bundle(url, sha256="0" * 64)
    import hashlib

    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    b1 = load_bundle(url, sha256=good)
    archive.unlink()  # the second open must come from the cache
    b2 = load_bundle(url, sha256=good)
    assert b1.root == b2.root and b1.sha256 == b2.sha256
    assert [t.label for t in b2.tasks] == ["mc", "schema", "lm"]
    assert json.loads((b2.root / "eval_data" / "mc.jsonl").read_text().splitlines()[0])["gold"] == 0
    assert not math.isnan(evaluate_core(Bigram(), CharTokenizer(), b2).core)


def test_bundle_url_secrets_never_reach_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from armlab.store import redact  # the one redaction, as for every URL armlab reads

    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "1")
    assert (
        redact("https://me:pw@example.org:8443/eval_bundle.zip?sig=SECRET#f")
        == "https://***@example.org:8443/eval_bundle.zip?sig=***#f"
    )
    with pytest.raises(ArmlabError) as e:
        load_bundle("http://me:pw@127.0.0.1:9/eval_bundle.zip?sig=SECRET")  # port 9: nothing listens
    assert (
        "SECRET" not in str(e.value)
        and "pw" not in str(e.value)
        and "127.0.0.1:9/eval_bundle.zip" in str(e.value)
    )
