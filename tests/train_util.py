"""Fixtures for the trainer tests: a tiny prepared experiment on real text, and CLI helpers.

The workdir is what `armlab prepare` + `armlab tokenizer` leave behind, built directly with
pyarrow so the trainer's tests do not depend on the data pipeline: an arm of FIVE shard files
with ONE row group each (the playbook's hang layout, an odd count), an eval set with `key` and
`text_key` columns, and a real BPE tokenizer (vocab 400) trained on the tokenizer sample.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from armlab.data.identity import doc_keys, text_keys
from armlab.spec import Experiment, load_experiment
from armlab.train import rundir
from armlab.workdir import open_workdir

ARM = "rand"
ARM_FILES = 5  # odd, one row group each
MODULES = [
    "json",
    "os",
    "collections",
    "pathlib",
    "functools",
    "itertools",
    "textwrap",
    "argparse",
    "re",
    "string",
]

EXPERIMENT_TOML = """\
name = "train-test"
workdir = "{workdir}"

[pool]
uri = "{pool}"

[tokenizer]
vocab_size = 400
train_chars = 300000

[[arms]]
name = "{arm}"
kind = "random"
ratio = 0.5

[model]
depth = 2
max_seq_len = 64

[train]
device_batch_size = 4
total_batch_size = 1536   # 4 x 64 x 6: splits over 1, 2 or 3 ranks
num_iterations = 24
eval_every = 8
eval_tokens = 4096
save_every = 8
seeds = [0]
allow_repeat = true   # the tiny arm is seen several times; the refusal is tested with allow_repeat=False
"""


def corpus() -> list[str]:
    """Real English text: the docstrings of a few stdlib modules (deterministic order)."""
    docs: list[str] = []
    for name in MODULES:
        mod = __import__(name)
        for _, obj in sorted(vars(mod).items()):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 40:
                docs.append(doc)
    return docs


def write_dir(out: Path, texts: list[str], files: int, row_group_rows: int, with_keys: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // files)
    entries = []
    for i in range(files):
        chunk = texts[i * per : (i + 1) * per]
        cols: dict[str, object] = {"text": chunk}
        if with_keys:
            cols["key"] = pa.array(doc_keys(None, pa.array(chunk)), pa.uint64())
            cols["text_key"] = pa.array(text_keys(chunk), pa.uint64())
        name = f"shard_{i:05d}.parquet"
        pq.write_table(pa.table(cols), out / name, row_group_size=row_group_rows, compression="zstd")
        entries.append({"name": name, "rows": len(chunk), "row_groups": -(-len(chunk) // row_group_rows),
                        "chars": sum(map(len, chunk)), "sha256": ""})  # fmt: skip
    manifest = {"rows": len(texts), "chars": sum(map(len, texts)), "files": entries, "complete": True,
                "selection": {}, "pool_fingerprint": "test"}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))


def build_workdir(root: Path) -> Path:
    """Write the experiment file and its prepared workdir; returns the experiment file."""
    from armlab.tokenizer import train_experiment_tokenizer

    docs = corpus()
    rng = np.random.default_rng(0)
    rng.shuffle(docs)
    n_eval = len(docs) // 10
    exp_file = root / "exp.toml"
    exp_file.write_text(EXPERIMENT_TOML.format(workdir=root / "wd", pool=root / "pool", arm=ARM))
    exp = load_experiment(exp_file)
    wd = open_workdir(exp)
    write_dir(wd.eval_dir, docs[:n_eval], files=1, row_group_rows=64, with_keys=True)
    write_dir(wd.tokenizer_sample_dir, docs[n_eval:], files=2, row_group_rows=256)
    train_experiment_tokenizer(exp)
    arm_docs = docs[n_eval:]
    write_dir(wd.data_dir(ARM), arm_docs, files=ARM_FILES, row_group_rows=len(arm_docs))
    return exp_file


def experiment(exp_file: Path) -> Experiment:
    return load_experiment(exp_file)


def armlab(
    *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def spawn(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "from armlab.cli import main; main()", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train_loss"] for m in rundir.read_metrics(run_dir) if "train_loss" in m}


def wait_for(pred, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
