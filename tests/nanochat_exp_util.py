"""A tiny prepared two-arm experiment for the nanochat engine tests (built directly with pyarrow,
like train_util's, so these tests do not depend on the data pipeline).

Two random arms of real text (stdlib docstrings), each three shard files of several row groups;
an eval set of two files; a real BPE tokenizer (vocab 400). Depth 2, sequence 128, 4 rows a
micro-batch, one micro-batch a step: a nanochat step takes ~0.1 s on one CPU core, eagerly
(`train.compile = false`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from armlab.workdir import open_workdir
from tok_util import stdlib_docs, write_shards

ARMS = ("alt", "rand")  # compare's reference is the first random arm: "alt" vs "rand"
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
name = "nanochat-test"
workdir = "{workdir}"

[pool]
uri = "pool-not-read-by-these-tests"

[tokenizer]
vocab_size = 400
train_chars = 300000

[[arms]]
name = "alt"
kind = "random"
ratio = 0.5
seed = 1

[[arms]]
name = "rand"
kind = "random"
ratio = 0.5

[model]
depth = 2
max_seq_len = 128

[train]
engine = "nanochat"
device_batch_size = 4
total_batch_size = 512
num_iterations = {steps}
eval_every = {eval_every}
eval_tokens = 1024
save_every = {save_every}
compile = false
allow_repeat = true
{train_extra}
[nanochat]
path = "{checkout}"
python = "{python}"
extra_args = ["--sample-every=-1"]
{sections}"""


def build_template(root: Path) -> tuple[Path, list[str]]:
    """A prepared workdir (data, eval set, tokenizer) at root/wd; returns it and the eval docs."""
    from armlab.spec import load_experiment
    from armlab.tokenizer import train_experiment_tokenizer

    docs = stdlib_docs(MODULES, min_chars=40)
    np.random.default_rng(0).shuffle(docs)
    n_eval = len(docs) // 10
    eval_docs, rest = docs[:n_eval], docs[n_eval:]
    exp_file = write_experiment(root, root / "wd", checkout=Path("/unused"), python=Path("/unused"))
    wd = open_workdir(load_experiment(exp_file))
    fake = {"selection": {}, "pool_fingerprint": "test"}  # what prepare would record
    write_shards(wd.eval_dir, eval_docs, files=2, row_group_rows=32, with_keys=True, **fake)
    write_shards(wd.tokenizer_sample_dir, rest, files=2, row_group_rows=256, **fake)
    train_experiment_tokenizer(load_experiment(exp_file))
    half = len(rest) // 2
    for arm, part in zip(ARMS, (rest[:half], rest[half:]), strict=True):
        write_shards(wd.data_dir(arm), part, files=3, row_group_rows=16, **fake)
    return wd.root, eval_docs


def write_experiment(
    root: Path,
    workdir: Path,
    checkout: Path,
    python: Path,
    steps: int = 8,
    eval_every: int = 4,
    save_every: int = 4,
    train_extra: str = "",
    sections: str = "",
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if "[evaluate]" not in sections:  # CORE off unless the test names a bundle (the default is DCLM's, online)
        sections += '\n[evaluate]\ncore_bundle = "none"\n'
    exp_file = root / "exp.toml"
    exp_file.write_text(
        EXPERIMENT_TOML.format(
            workdir=workdir,
            checkout=checkout,
            python=python,
            steps=steps,
            eval_every=eval_every,
            save_every=save_every,
            train_extra=train_extra,
            sections=sections,
        )  # fmt: skip
    )
    return exp_file


def copy_workdir(template: Path, dest: Path) -> Path:
    """A private copy of the prepared workdir (runs, leases and reports never leak between tests)."""
    shutil.copytree(template, dest, symlinks=True)
    return dest
