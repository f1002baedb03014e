"""Shared fixtures. Area-specific fixtures live in the area's own test modules or helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep test runs hermetic: no hub calls, no W&B, small thread pools.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def ray_cluster():
    """One real two-node Ray cluster on loopback per test session (per xdist worker): tests/ray_util.py."""
    from ray_util import start_cluster

    cluster = start_cluster()
    print(f"\nray cluster {cluster.address}: 2 nodes up in {cluster.startup_s:.1f}s")
    yield cluster
    cluster.stop()


# A private Slurm cluster (tests/slurm_util.py) per pytest-xdist worker, started on first use.
@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """One node (n1, 4 CPUs), partitions `cpu` (default) and `gpu`."""
    from slurm_util import slurm_cluster

    with slurm_cluster(tmp_path_factory.mktemp("slurm"), nodes=1) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def slurm_2nodes(tmp_path_factory):
    """Two nodes (n1, n2: two slurmd on this machine, 4 CPUs each), same partitions."""
    from slurm_util import slurm_cluster

    with slurm_cluster(tmp_path_factory.mktemp("slurm2"), nodes=2) as cluster:
        yield cluster
