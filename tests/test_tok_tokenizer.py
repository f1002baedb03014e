"""Tokenizer: trained with rustbpe on a real parquet sample, encoded with tiktoken, saved atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from armlab.errors import ArmlabError
from armlab.tokenizer import SPECIAL_TOKENS, Tokenizer, load_experiment_tokenizer, train_experiment_tokenizer
from armlab.workdir import open_workdir
from tok_util import corpus, experiment, write_shards

TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "numbers 1234567 and 3.14159, dates 2026-02-11",
    "ünïcödé café 東京 😀 mixed\nlines\r\n\ttabs   and  spaces ",
    "def f(x):\n    return x ** 2  # comment",
    "<|bos|> is plain text here, not the special token",
    " ",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    exp = experiment(root)
    write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(), files=2, row_group_rows=64)
    return exp, train_experiment_tokenizer(exp)


def test_trains_requested_vocab_and_roundtrips(trained):
    exp, tok = trained
    assert tok.vocab_size == exp.tokenizer.vocab_size
    assert tok.bos_id == exp.tokenizer.vocab_size - len(SPECIAL_TOKENS)  # specials follow the merges
    for text in TEXTS:
        ids = tok.encode([text], prepend_bos=False)[0]
        assert tok.decode(ids) == text
        assert tok.bos_id not in ids  # special-token text is never encoded as the special
    # merges were learned from the sample: common words are single tokens, so text compresses
    sample = " ".join(corpus()[:50])
    assert len(tok.encode([sample], prepend_bos=False)[0]) < 0.6 * len(sample.encode())


def test_batch_encode_equals_single_and_prepends_bos(trained):
    _, tok = trained
    batch = tok.encode(TEXTS, prepend_bos=True)
    for text, ids in zip(TEXTS, batch, strict=True):
        assert ids[0] == tok.bos_id
        assert ids[1:] == tok.enc.encode_ordinary(text)
    assert tok.encode(TEXTS, prepend_bos=False) == [ids[1:] for ids in batch]


def test_token_bytes_match_decoding(trained):
    _, tok = trained
    specials = {tok.enc.encode_single_token(s) for s in SPECIAL_TOKENS}
    for i in range(tok.vocab_size):
        expected = 0 if i in specials else len(tok.enc.decode_single_token_bytes(i))
        assert tok.token_bytes[i] == expected
    assert (tok.token_bytes[:256] == 1).all() and tok.token_bytes.max() > 1
    for ids, text in zip(tok.encode(TEXTS), TEXTS, strict=True):
        assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))  # BOS counts 0 bytes


def test_saved_files_and_reload(trained):
    exp, tok = trained
    d = open_workdir(exp, create=False).tokenizer_dir
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["complete"] and manifest["fingerprint"] == tok.fingerprint
    assert manifest["vocab_size"] == tok.vocab_size and manifest["bos_id"] == tok.bos_id
    assert np.array_equal(np.load(d / "token_bytes.npy"), tok.token_bytes)
    nanochat_table = torch.load(d / "token_bytes.pt", weights_only=True)  # nanochat's get_token_bytes()
    assert nanochat_table.dtype == torch.int32 and nanochat_table.tolist() == tok.token_bytes.tolist()
    again = Tokenizer.load(d)
    assert again.fingerprint == tok.fingerprint
    assert again.encode(TEXTS) == tok.encode(TEXTS)
    assert not list(d.glob(".*.tmp"))  # nothing half-written left behind
    assert load_experiment_tokenizer(exp).fingerprint == tok.fingerprint


def test_rerun_is_noop_and_other_spec_is_refused(trained):
    exp, tok = trained
    d = open_workdir(exp, create=False).tokenizer_dir
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()}
    assert train_experiment_tokenizer(exp).fingerprint == tok.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in d.iterdir() if p.is_file()} == before

    other = experiment(d.parent.parent, vocab_size=300)  # same workdir, another tokenizer spec
    with pytest.raises(ArmlabError, match=r"differs in: tokenizer.vocab_size\); rerun with --overwrite"):
        train_experiment_tokenizer(other)
    with pytest.raises(
        ArmlabError,
        match=r"differs from this spec in: tokenizer.vocab_size; run `armlab tokenizer EXP --overwrite`",
    ):
        load_experiment_tokenizer(other)


def test_training_is_deterministic_and_overwrite_retrains(tmp_path):
    exp = experiment(tmp_path, vocab_size=300)
    write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(), files=3, row_group_rows=50)
    first = train_experiment_tokenizer(exp)
    again = train_experiment_tokenizer(exp, overwrite=True)
    assert again.fingerprint == first.fingerprint  # same sample, same merges
    bigger = experiment(tmp_path, vocab_size=350)
    retrained = train_experiment_tokenizer(bigger, overwrite=True)
    assert retrained.vocab_size == 350 and retrained.fingerprint != first.fingerprint
    assert load_experiment_tokenizer(bigger).fingerprint == retrained.fingerprint


def test_train_chars_and_doc_cap_bound_the_sample(tmp_path):
    exp = experiment(tmp_path, train_chars=5_000, doc_cap=100)
    write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(), files=1, row_group_rows=64)
    train_experiment_tokenizer(exp)
    manifest = json.loads((open_workdir(exp, create=False).tokenizer_dir / "manifest.json").read_text())
    # whole documents, each capped at doc_cap (as nanochat's tok_train reads them), until train_chars
    assert 5_000 <= manifest["train_chars_used"] < 5_000 + 100


def test_refusals(tmp_path):
    exp = experiment(tmp_path)
    with pytest.raises(ArmlabError, match=r"run `armlab prepare EXP` first"):
        train_experiment_tokenizer(exp)
    sample = open_workdir(exp).tokenizer_sample_dir
    write_shards(sample, corpus(), files=1, row_group_rows=64, manifest=False)
    with pytest.raises(ArmlabError, match=r"no complete tokenizer sample"):  # shards without manifest
        train_experiment_tokenizer(exp)
    with pytest.raises(ArmlabError, match=r"no trained tokenizer here; run `armlab tokenizer EXP`"):
        Tokenizer.load(tmp_path / "nowhere")
    with pytest.raises(ArmlabError, match=r"vocab_size \(262\) must be >= 265"):
        write_shards(sample, corpus(), files=1, row_group_rows=64)
        train_experiment_tokenizer(experiment(tmp_path, vocab_size=262))


def test_corrupted_tokenizer_is_refused(trained, tmp_path):
    exp, _ = trained
    d = open_workdir(exp, create=False).tokenizer_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("tokenizer.pkl", "token_bytes.npy"):
        (copy / name).write_bytes((d / name).read_bytes())
    manifest = json.loads((d / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 16}))
    with pytest.raises(ArmlabError, match=r"has fingerprint .* manifest.json says 0000"):
        Tokenizer.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ArmlabError, match=r"incomplete"):
        Tokenizer.load(copy)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "tokenizer.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ArmlabError, match=r"tokenizer.pkl: unreadable"):
        Tokenizer.load(copy)


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = "import sys; from armlab.cli import main; sys.argv = ['armlab', *sys.argv[1:]]; main()"
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.e2e
def test_cli_tokenizer(tmp_path):
    exp = experiment(tmp_path, vocab_size=300)
    toml = tmp_path / "exp.toml"
    toml.write_text(
        f'name = "tok-test"\nworkdir = "{tmp_path / "wd"}"\n[pool]\nuri = "{tmp_path / "pool"}"\n'
        "[tokenizer]\nvocab_size = 300\ntrain_chars = 200000\ndoc_cap = 2000\n"
        '[[arms]]\nname = "r"\nkind = "random"\nratio = 0.5\n[model]\ndepth = 2\nmax_seq_len = 64\n'
    )
    missing = _cli("tokenizer", str(toml))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"armlab: error: {tmp_path / 'wd' / 'tokenizer' / 'sample'}: no complete tokenizer sample; "
        "run `armlab prepare EXP` first"
    ]
    write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(), files=2, row_group_rows=64)
    done = _cli("tokenizer", str(toml))
    assert done.returncode == 0, done.stderr
    assert "fingerprint" in done.stderr
    fp = json.loads((tmp_path / "wd" / "tokenizer" / "manifest.json").read_text())["fingerprint"]
    again = _cli("tokenizer", str(toml))
    assert (
        again.returncode == 0
        and f"up to date ({tmp_path / 'wd' / 'tokenizer'}, fingerprint {fp})" in again.stderr
    )
    toml.write_text(toml.read_text().replace("vocab_size = 300", "vocab_size = 320"))
    refused = _cli("tokenizer", str(toml))
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert _cli("tokenizer", str(toml), "--overwrite").returncode == 0


def test_sample_without_text_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    exp = experiment(tmp_path)
    sample = write_shards(open_workdir(exp).tokenizer_sample_dir, corpus(20), files=1, row_group_rows=64)
    pq.write_table(pa.table({"body": ["x"]}), sample / "shard_00001.parquet")
    with pytest.raises(ArmlabError, match=r"shard_00001.parquet: no 'text' column"):
        train_experiment_tokenizer(exp)
    assert not (open_workdir(exp).tokenizer_dir / "manifest.json").exists()
