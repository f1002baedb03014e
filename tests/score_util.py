"""Models and pools for scorer tests, made here (no network): a fastText classifier trained on the
demo's good vs junk documents, a tiny randomly initialised BERT sequence classifier saved with
`save_pretrained` (its WordPiece tokenizer trained on the same documents), random heads saved as
safetensors and npz, and a pool of good and junk documents with ids and an embedding column.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tqdm

# save_pretrained's progress bar would start tqdm's monitor thread, and a test process running a
# thread gets a forkserver for `score`'s workers (each re-importing torch) instead of a fork
tqdm.tqdm.monitor_interval = 0


def demo_documents(n_junk: int = 150, seed: int = 0) -> tuple[list[str], list[str]]:
    """(good, junk): the language reference topics cut into documents the way the demo pool cuts
    the stdlib's docstrings, and the demo's junk (word salad, boilerplate, keyword spam)."""
    from pydoc_data.topics import topics

    from armlab.demo.pool import MIN_CHARS, STOPWORDS, WORD, _chunks, junk_documents

    good = [c.strip() for name in sorted(topics) for c in _chunks(topics[name]) if len(c.strip()) >= MIN_CHARS]
    vocab = sorted({w for d in good for w in WORD.findall(d) if w.lower() not in STOPWORDS})
    junk = [t for _, t in junk_documents(n_junk, vocab, [len(d) for d in good], random.Random(seed))]
    return good, junk


def train_fasttext(path: Path, good: list[str], junk: list[str], seed: int = 0) -> Path:
    """A supervised fastText model: __label__hq for good documents, __label__cc for junk (DCLM's labels)."""
    import fasttext

    train = path.with_suffix(".train.txt")
    rows = [("__label__hq", t) for t in good] + [("__label__cc", t) for t in junk]
    random.Random(seed).shuffle(rows)
    with open(train, "w", encoding="utf-8") as f:
        for label, text in rows:
            f.write(f"{label} {' '.join(text.split())}\n")
    model = fasttext.train_supervised(
        str(train), epoch=10, lr=0.5, wordNgrams=2, dim=16, minCount=1, bucket=100_000, thread=1, seed=seed,
        verbose=0,
    )  # 100k n-gram buckets: a 7 MB model (fastText's default 2M makes it 128 MB)
    model.save_model(str(path))
    train.unlink()
    return path


def make_bert(directory: Path, texts: list[str], num_labels: int = 1, hidden: int = 32, layers: int = 2,
              max_position: int = 128, vocab_size: int = 400, seed: int = 0) -> Path:  # fmt: skip
    """A random BertForSequenceClassification (one regression logit, or `num_labels` named
    good / junk / ...) and its WordPiece tokenizer, saved with save_pretrained into `directory`."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    from tokenizers.processors import TemplateProcessing

    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=max_position,
    )  # fmt: skip
    labels = {"id2label": {i: n for i, n in enumerate(["good", "junk", "other"][:num_labels])}} if num_labels > 1 else {}
    config = BertConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=max_position, num_labels=num_labels, **labels,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def make_head(path: Path, dim: int, hidden: int | None = None, outputs: int = 1, seed: int = 0) -> Path:
    """A random linear head (hidden None) or a 2-layer MLP (`0.weight`, `2.weight`: an
    nn.Sequential's names), as .safetensors or .npz by the path's suffix."""
    rng = np.random.default_rng(seed)
    if hidden is None:
        tensors = {"weight": rng.normal(size=(outputs, dim)), "bias": rng.normal(size=(outputs,))}
    else:
        tensors = {
            "0.weight": rng.normal(size=(hidden, dim)), "0.bias": rng.normal(size=(hidden,)),
            "2.weight": rng.normal(size=(outputs, hidden)), "2.bias": rng.normal(size=(outputs,)),
        }  # fmt: skip
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
        np.savez(path, **tensors)
    else:
        from safetensors.numpy import save_file

        save_file(tensors, str(path))
    return path


def head_reference(path: Path, emb: np.ndarray) -> np.ndarray:
    """What a head scores, computed here independently with torch (relu MLP / linear)."""
    import torch

    if path.suffix == ".npz":
        with np.load(path) as z:
            t = {k: torch.from_numpy(z[k]).double() for k in z.files}
    else:
        from safetensors.torch import load_file

        t = {k: v.double() for k, v in load_file(str(path)).items()}
    x = torch.from_numpy(emb).double()
    if "weight" in t:
        return torch.nn.functional.linear(x, t["weight"], t["bias"])[:, 0].float().numpy()
    h = torch.relu(torch.nn.functional.linear(x, t["0.weight"], t["0.bias"]))
    return torch.nn.functional.linear(h, t["2.weight"], t["2.bias"])[:, 0].float().numpy()


def make_scored_pool(
    directory: Path, good: list[str], junk: list[str], files: int = 2, row_groups: int = 3, dim: int = 8,
    with_id: bool = True, seed: int = 0,
) -> list[Path]:  # fmt: skip
    """Parquet files of good and junk documents, shuffled: `id`, `text`, `source` (good / junk),
    `score` (1 for good, 0 for junk: what a perfect classifier says), `embedding` (dim floats,
    a few of them null) and `token_count`."""
    rng = random.Random(seed)
    rows = [("good", t) for t in good] + [("junk", t) for t in junk]
    rng.shuffle(rows)
    nrng = np.random.default_rng(seed)
    emb = nrng.normal(size=(len(rows), dim)).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    bounds = np.linspace(0, len(rows), files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        part = rows[lo:hi]
        cols: dict[str, pa.Array | list[object]] = {}
        if with_id:
            cols["id"] = [f"doc-{i:06d}" for i in range(lo, hi)]
        cols["text"] = [t for _, t in part]
        cols["source"] = [k for k, _ in part]
        cols["score"] = [1.0 if k == "good" else 0.0 for k, _ in part]
        cols["token_count"] = [len(t) // 4 for _, t in part]
        vecs = [None if (lo + j) % 97 == 5 else emb[lo + j].tolist() for j in range(hi - lo)]
        cols["embedding"] = pa.array(vecs, pa.list_(pa.float32()))
        path = directory / f"part-{f:03d}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=max(1, -(-(hi - lo) // row_groups)))
        paths.append(path)
    return paths
