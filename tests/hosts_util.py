"""Helpers for the host-seam tests (tests/test_ops_hosts*.py): a tiny CPU experiment file with
`[[hosts]]` entries, the real CLI in a subprocess, bounded polls, and the comparison of two runs'
loss curves and weights."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ARM_TOP = """
[[arms]]
name = "top"
kind = "top"
ratio = 0.5
score_column = "score"
"""


def tiny_toml(
    name: str,
    workdir: Path,
    pool: Path,
    *,
    top: bool = False,
    steps: int = 12,
    batch: int = 64,
    seeds: str = "[0]",
    save_every: int | None = None,
    hosts: str = "",
) -> str:
    """A depth-1 CPU experiment on `pool` (tests/data_util.make_pool: 1,200 docs is plenty): arm
    `rand` (and `top`), `steps` steps of `batch` tokens (2 x 32 a micro-step), val bpb only."""
    return f"""\
name = "{name}"
workdir = "{workdir}"

[pool]
uri = "{pool}"
id_column = "id"

[eval]
docs = 60

[tokenizer]
vocab_size = 300
train_chars = 60000

[shards]
rows_per_shard = 200
row_group_rows = 32

[[arms]]
name = "rand"
kind = "random"
ratio = 0.5
{ARM_TOP if top else ""}
[model]
depth = 1
max_seq_len = 32

[evaluate]
core_bundle = "none"

[train]
device_batch_size = 2
total_batch_size = {batch}
num_iterations = {steps}
eval_every = {steps}
eval_tokens = 256
save_every = {save_every or steps}
compile = false
allow_repeat = true
seeds = {seeds}
{hosts}"""


def armlab(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess."""
    cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def until(what: str, fn: Callable[[], T], timeout: float = 300) -> T:
    """Poll `fn` until it returns something true (bounded: the tests assert what happened, not when)."""
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def same_run(a: Path, b: Path, step: int) -> float:
    """Max abs difference of two runs' weights at `step`; their loss curves must be equal."""
    import torch

    from armlab.train import checkpoint
    from train_util import train_losses

    assert train_losses(a) == train_losses(b) and len(train_losses(a)) == step
    wa: dict[str, Any]
    wa, wb = (torch.load(checkpoint.checkpoint_dir(d, step) / "model.pt") for d in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
