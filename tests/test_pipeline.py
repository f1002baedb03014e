"""armlab.pipeline (`armlab run`): device requests that cannot be met are refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from armlab.errors import ArmlabError
from armlab.pipeline import run_experiment
from armlab.spec import parse_experiment


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without CUDA (this one has GPUs)")
def test_run_with_gpus_on_a_cpu_host_refuses_before_anything_starts(tmp_path: Path) -> None:
    exp = parse_experiment({
        "name": "nogpu", "workdir": str(tmp_path / "wd"), "pool": {"uri": str(tmp_path / "pool")},
        "arms": [{"name": "rand", "kind": "random", "ratio": 0.5}],
    })  # fmt: skip
    with pytest.raises(ArmlabError, match=r"--num-gpus 2 but 0 GPUs visible.*use --device cpu"):
        run_experiment(exp, num_gpus=2)
    with pytest.raises(ArmlabError, match=r"--num-gpus is for CUDA"):
        run_experiment(exp, num_gpus=2, device="cpu")
    assert not (tmp_path / "wd").exists()  # no workdir, no prepare, nothing written
