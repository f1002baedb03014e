"""The experiment's shared BPE tokenizer: trained with rustbpe, encoded with tiktoken.

Follows nanochat's tokenizer: a GPT-4-style split pattern (with \\p{N}{1,2} instead of {1,3}, so
small vocabularies do not spend many tokens on numbers), byte-level BPE merges learned by
rustbpe, nanochat's special tokens appended after the merges (`<|bos|>` first), and tiktoken for
fast multi-threaded encoding.

It is trained once per experiment on the neutral pool sample `<workdir>/tokenizer/sample/`
(written by `armlab prepare`; never an arm, never the eval set; sized in documents, each capped
at `doc_cap` chars as read here, see `data/holdout.py`) and saved as

    <workdir>/tokenizer/tokenizer.pkl    the tiktoken Encoding (nanochat's format)
    <workdir>/tokenizer/token_bytes.npy  UTF-8 bytes each token id decodes to (0 for specials)
    <workdir>/tokenizer/token_bytes.pt   the same as an int32 torch tensor (nanochat's file)
    <workdir>/tokenizer/manifest.json    fingerprint, the spec it was trained for, written last

The fingerprint (sha256 of the merges, the pattern and the special tokens) goes into every
run.json, so runs trained with different tokenizers can never be compared by mistake.
"""

from __future__ import annotations

import hashlib
import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from armlab.errors import ArmlabError
from armlab.progress import console, progress
from armlab.spec import Experiment, fingerprint_diff
from armlab.vocab import BOS, SPECIAL_TOKENS
from armlab.workdir import (
    Workdir,
    atomic_path,
    atomic_write_json,
    freeze_spec,
    open_workdir,
    read_json,
    step_lock,
)

# GPT-4's split pattern with nanochat's change: numbers split into groups of 1-2 digits, not 1-3.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

ENCODING_FILE = "tokenizer.pkl"
TOKEN_BYTES_FILE = "token_bytes.npy"
NANOCHAT_TOKEN_BYTES_FILE = "token_bytes.pt"  # what nanochat's get_token_bytes() loads
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1


def tokenizer_fingerprint(
    mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]
) -> str:
    """sha256 (16 hex chars, like spec fingerprints) of the merges, the split pattern and the specials."""
    h = hashlib.sha256()
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(b"\0pattern\0" + pattern.encode())
    for name, idx in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        h.update(b"\0special\0" + name.encode() + idx.to_bytes(4, "little"))
    return h.hexdigest()[:16]


class Tokenizer:
    """A tiktoken Encoding plus what training and bits-per-byte need (BOS id, token_bytes)."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        self.bos_id: int = enc.encode_single_token(BOS)
        self.vocab_size: int = enc.n_vocab
        self.fingerprint: str = tokenizer_fingerprint(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)
        # bytes per token for bits-per-byte; special tokens count 0 so they drop out of the sums
        specials = set(enc._special_tokens.values())
        self.token_bytes: np.ndarray = np.array(
            [0 if i in specials else len(enc.decode_single_token_bytes(i)) for i in range(self.vocab_size)],
            dtype=np.int32,
        )

    @classmethod
    def from_merges(cls, mergeable_ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> Tokenizer:
        """Build the tiktoken Encoding: merges first, then the special tokens after them."""
        offset = len(mergeable_ranks)
        special_tokens = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            name="armlab-rustbpe",
            pat_str=pattern,
            mergeable_ranks=mergeable_ranks,
            special_tokens=special_tokens,
        )
        return cls(enc)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a saved tokenizer; refuses a missing, incomplete or corrupted one with the fix."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        try:
            manifest = read_json(manifest_path)
        except FileNotFoundError:
            raise ArmlabError(
                f"{directory}: no trained tokenizer here; run `armlab tokenizer EXP` first"
            ) from None
        if not manifest.get("complete"):
            raise ArmlabError(f"{directory}: tokenizer is incomplete; rerun `armlab tokenizer EXP`")
        try:
            with open(directory / ENCODING_FILE, "rb") as f:
                enc = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
            raise ArmlabError(
                f"{directory / ENCODING_FILE}: unreadable ({e}); rerun `armlab tokenizer EXP --overwrite`"
            ) from None
        tok = cls(enc)
        if tok.fingerprint != manifest.get("fingerprint"):
            raise ArmlabError(
                f"{directory}: {ENCODING_FILE} has fingerprint {tok.fingerprint}, manifest.json says "
                f"{manifest.get('fingerprint')}; rerun `armlab tokenizer EXP --overwrite`"
            )
        return tok

    def save(self, directory: str | Path, manifest: dict[str, Any]) -> None:
        """Write the encoding and token_bytes, then the manifest (last, so its presence means complete)."""
        directory = Path(directory)
        with atomic_path(directory / ENCODING_FILE) as tmp, open(tmp, "wb") as f:
            pickle.dump(self.enc, f)
        with atomic_path(directory / TOKEN_BYTES_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, self.token_bytes)
        import torch  # only here: the same table in nanochat's format, so a nanochat checkout can use this dir

        with atomic_path(directory / NANOCHAT_TOKEN_BYTES_FILE) as tmp:
            torch.save(torch.from_numpy(self.token_bytes), tmp)
        body = {
            **manifest,
            "version": MANIFEST_VERSION,
            "fingerprint": self.fingerprint,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "special_tokens": SPECIAL_TOKENS,
            "pattern": self.enc._pat_str,
            "complete": True,
        }
        atomic_write_json(directory / MANIFEST_FILE, body)

    def encode(self, texts: list[str], prepend_bos: bool = True, num_threads: int = 8) -> list[list[int]]:
        """Token ids of each text (special-token strings in the text are encoded as plain text)."""
        ids = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        if prepend_bos:
            ids = [[self.bos_id, *row] for row in ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)


# -- training ---------------------------------------------------------------------------------------
SPEC_KEYS = ("experiment", "tokenizer", "pool", "eval")  # a tokenizer is valid for runs iff these match


def _tokenizer_spec(exp: Experiment, sample_manifest: dict[str, Any]) -> dict[str, Any]:
    """What a saved tokenizer must match to be reused: the spec it was trained for and its sample."""
    return {
        "experiment": exp.name,
        "tokenizer": exp.tokenizer.model_dump(),
        "pool": exp.pool.model_dump(),
        "eval": exp.eval.model_dump(),
        "sample_files": [[f.get("name"), f.get("sha256")] for f in sample_manifest.get("files", [])],
    }


def _sample_manifest(sample_dir: Path) -> dict[str, Any]:
    try:
        manifest = read_json(sample_dir / MANIFEST_FILE)
    except FileNotFoundError:
        manifest = {}
    if not manifest.get("complete") or not sorted(sample_dir.glob("shard_*.parquet")):
        raise ArmlabError(f"{sample_dir}: no complete tokenizer sample; run `armlab prepare EXP` first")
    return manifest


def _sample_texts(
    files: list[Path], train_chars: int, doc_cap: int, on_chars: Callable[[int], None]
) -> Iterator[str]:
    """Documents of the sample in file order (its seeded order), each capped at doc_cap chars,
    until train_chars: whole documents, counted as prepare counted them when it sized the sample."""
    import pyarrow.parquet as pq

    left = train_chars
    for path in files:
        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise ArmlabError(f"{path}: no 'text' column; rerun `armlab prepare EXP --overwrite`")
        for batch in pf.iter_batches(batch_size=1024, columns=["text"]):
            texts = []
            for text in batch.column(0).to_pylist():
                if text and left > 0:
                    texts.append(text[:doc_cap])
                    left -= len(texts[-1])
            on_chars(sum(map(len, texts)))  # one progress update per batch, not per document
            yield from texts
            if left <= 0:
                return


def _with_done(texts: Iterator[str], on_done: Callable[[], None]) -> Iterator[str]:
    yield from texts
    on_done()


def spec_diff(saved_spec: dict[str, Any], exp: Experiment) -> list[str]:
    """Dotted keys in which a tokenizer manifest's `spec` differs from what `exp` needs (empty: usable)."""
    want = _tokenizer_spec(exp, {})
    return fingerprint_diff({k: saved_spec.get(k) for k in SPEC_KEYS}, {k: want[k] for k in SPEC_KEYS})


def load_experiment_tokenizer(exp: Experiment) -> Tokenizer:
    """The experiment's trained tokenizer; refuses one trained for another experiment or spec."""
    directory = open_workdir(exp, create=False).tokenizer_dir
    tok = Tokenizer.load(directory)
    saved = read_json(directory / MANIFEST_FILE).get("spec", {})
    changed = spec_diff(saved, exp)
    if changed:
        raise ArmlabError(
            f"{directory}: tokenizer was trained for experiment {saved.get('experiment')!r} and differs from "
            f"this spec in: {', '.join(changed)}; run `armlab tokenizer EXP --overwrite` to retrain it"
        )
    return tok


def trained_vocab_size(exp: Experiment) -> int | None:
    """The vocabulary of the experiment's trained tokenizer (its manifest, nothing loaded), None
    before it is trained or when it was trained for another spec. It can be smaller than
    `tokenizer.vocab_size` (a small sample stops the merges early), and the model's embeddings,
    FLOPs and auto batch size follow it: `plan` uses it once it exists."""
    path = open_workdir(exp, create=False).tokenizer_dir / MANIFEST_FILE
    try:
        manifest = read_json(path)
    except (FileNotFoundError, ArmlabError):
        return None
    if not manifest.get("complete") or spec_diff(manifest.get("spec", {}), exp):
        return None
    return int(manifest["vocab_size"])


def train_experiment_tokenizer(exp: Experiment, overwrite: bool = False) -> Tokenizer:
    """Train (or reuse) the experiment's tokenizer from `<workdir>/tokenizer/sample/`.

    A complete tokenizer trained for the same spec and sample is reused (no-op). One trained for
    another experiment, spec or sample is refused unless `overwrite`.
    """
    wd = open_workdir(exp, create=False)
    _sample_manifest(wd.tokenizer_sample_dir)  # no sample yet: refused before anything is written
    with step_lock(wd, "tokenizer"):  # a second `armlab tokenizer` waits, then finds it up to date
        tok = _train(exp, wd, overwrite)
        freeze_spec(wd, exp)
    return tok


def _train(exp: Experiment, wd: Workdir, overwrite: bool) -> Tokenizer:
    import rustbpe

    out_dir = wd.tokenizer_dir
    sample_manifest = _sample_manifest(wd.tokenizer_sample_dir)
    spec = _tokenizer_spec(exp, sample_manifest)

    try:
        existing = read_json(out_dir / MANIFEST_FILE)
    except FileNotFoundError:
        existing = None
    if existing is not None and existing.get("complete") and not overwrite:
        if existing.get("spec") == spec:
            tok = Tokenizer.load(out_dir)
            console.print(f"tokenizer: up to date ({out_dir}, fingerprint {tok.fingerprint})")
            return tok
        old = existing.get("spec") or {}
        changed = fingerprint_diff(old, spec)
        raise ArmlabError(
            f"{out_dir}: holds a tokenizer trained for a different spec (differs in: {', '.join(changed)}); "
            "rerun with --overwrite to retrain it (runs trained with the old one will no longer compare)"
        )

    n_ranks = exp.tokenizer.vocab_size - len(SPECIAL_TOKENS)  # 256 byte tokens + the merges
    if n_ranks < 256:
        raise ArmlabError(
            f"tokenizer.vocab_size ({exp.tokenizer.vocab_size}) must be >= {256 + len(SPECIAL_TOKENS)} "
            f"(256 byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    files = sorted(wd.tokenizer_sample_dir.glob("shard_*.parquet"))
    sample_chars = (
        sample_manifest.get("capped_chars") or sample_manifest.get("chars") or exp.tokenizer.train_chars
    )
    total = min(exp.tokenizer.train_chars, int(sample_chars))
    t0 = time.time()
    seen = 0
    with progress() as bar:
        task = bar.add_task("tokenizer: reading sample", total=total, unit="chars", bytes=0)

        def on_chars(n: int) -> None:
            nonlocal seen
            seen += n
            bar.update(task, advance=n, bytes=seen)

        def on_done() -> None:  # the sample is read; rustbpe now learns the merges (no progress inside)
            bar.update(task, completed=total, description=f"tokenizer: learning {n_ranks - 256:,} merges")

        texts = _with_done(
            _sample_texts(files, exp.tokenizer.train_chars, exp.tokenizer.doc_cap, on_chars), on_done
        )
        trainer = rustbpe.Tokenizer()
        # rustbpe counts chunks in parallel as the iterator feeds it, then learns the merges
        trainer.train_from_iterator(texts, n_ranks, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in trainer.get_mergeable_ranks()}
    tok = Tokenizer.from_merges(ranks, trainer.get_pattern())
    if len(ranks) < n_ranks:
        console.print(
            f"[yellow]tokenizer: learned {len(ranks) - 256} merges of {n_ranks - 256} requested (vocab "
            f"{tok.vocab_size}, not {exp.tokenizer.vocab_size}): the sample holds too little text[/]"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete until the new manifest lands
    tok.save(out_dir, {"spec": spec, "train_chars_used": seen, "train_seconds": round(time.time() - t0, 2)})
    console.print(
        f"tokenizer: trained on {seen:,} chars in {time.time() - t0:.1f}s: vocab {tok.vocab_size:,}, "
        f"fingerprint {tok.fingerprint} -> {out_dir}"
    )
    return tok
