"""Fixtures for the trainer tests: a tiny prepared experiment on real text, and CLI helpers.

The workdir is what `armlab prepare` + `armlab tokenizer` leave behind, built directly with
pyarrow so the trainer's tests do not depend on the data pipeline: an arm of FIVE shard files
with ONE row group each (the playbook's hang layout, an odd count), an eval set with `key` and
`text_key` columns, and a real BPE tokenizer (vocab 400) trained on the tokenizer sample.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

from armlab.runs import PLAN_JSON, read_metrics
from armlab.spec import Experiment, load_experiment
from armlab.workdir import open_workdir
from tok_util import stdlib_docs, write_shards

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


def build_workdir(root: Path) -> Path:
    """Write the experiment file and its prepared workdir; returns the experiment file."""
    from armlab.tokenizer import train_experiment_tokenizer

    docs = stdlib_docs(MODULES, min_chars=40)
    rng = np.random.default_rng(0)
    rng.shuffle(docs)
    n_eval = len(docs) // 10
    exp_file = root / "exp.toml"
    exp_file.write_text(EXPERIMENT_TOML.format(workdir=root / "wd", pool=root / "pool", arm=ARM))
    exp = load_experiment(exp_file)
    wd = open_workdir(exp)
    fake = {"selection": {}, "pool_fingerprint": "test"}  # what prepare would record
    write_shards(wd.eval_dir, docs[:n_eval], files=1, row_group_rows=64, with_keys=True, **fake)
    write_shards(wd.tokenizer_sample_dir, docs[n_eval:], files=2, row_group_rows=256, **fake)
    train_experiment_tokenizer(exp)
    arm_docs = docs[n_eval:]
    write_shards(wd.data_dir(ARM), arm_docs, files=ARM_FILES, row_group_rows=len(arm_docs), **fake)
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
    return {m["step"]: m["train_loss"] for m in read_metrics(run_dir).records if "train_loss" in m}


def wait_for(pred, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_dir(exp_file: Path, run: str) -> Path:
    return open_workdir(experiment(exp_file), create=False).run_dir(ARM, run)


def data_dir(exp_file: Path) -> Path:
    return open_workdir(experiment(exp_file), create=False).data_dir(ARM)


def worker_procs(run: Path) -> list[psutil.Process]:
    """The built-in engine's rank processes of a run (their command line names its plan.json)."""
    plan = str(run / PLAN_JSON)
    return [p for p in psutil.process_iter(["cmdline"]) if plan in (p.info["cmdline"] or [])]


def unused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
