"""Azure through the storage seam: the same retry layer as every store (ARMLAB_NET_ATTEMPTS /
ARMLAB_NET_BACKOFF, counted in the one line), and a pool on Azure (Azurite) read like any
remote pool, each read checked against the ETag listed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from armlab.data.pool import iter_columns, list_pool
from armlab.errors import ArmlabError
from armlab.spec import PoolSpec
from azurite_util import ACCOUNT, KEY, azurite_env, free_port
from data_util import experiment_toml, make_pool
from test_data_prepare import assert_refused
from test_data_ranged import prepare_at, same_outputs

pytestmark = pytest.mark.e2e


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    yield from azurite_env(tmp_path, monkeypatch)


def test_the_azure_path_honours_armlab_net_attempts_and_backoff(tmp_path: Path) -> None:
    """Nothing listens on the endpoint (Azurite stopped): 3 attempts, 2 retry lines, one error."""
    port = free_port()  # closed again once chosen
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AZURE_STORAGE_")},
        "AZURE_STORAGE_CONNECTION_STRING": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        ),
        "ARMLAB_NET_ATTEMPTS": "3",
        "ARMLAB_NET_BACKOFF": "0.05",
    }
    make_pool(tmp_path / "pool", 60, n_files=1)
    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(tmp_path / "pool")))
    res = subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", "pull", str(exp), "--arm", "rand",
         "--from", "az://arms/rand"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    line = assert_refused(
        res,
        "az://arms/rand/manifest.json",
        f"cannot reach http://127.0.0.1:{port}/{ACCOUNT} after 3 attempts",
    )
    assert "rerun the same command" in line and KEY not in res.stderr
    assert res.stderr.count("retrying in 0.1s") == 2 and "(attempt 2/3)" in res.stderr


def test_a_pool_on_azure_prepares_like_a_local_one_and_reads_the_listed_version(
    azurite, tmp_path: Path
) -> None:
    paths = make_pool(tmp_path / "local", 1200, n_files=2, row_groups_per_file=3, seed=6)
    cc = azurite.client().create_container("pool")
    for p in paths:
        cc.upload_blob(f"data/{p.name}", p.read_bytes())
    res, local = prepare_at(tmp_path, "local-prep", str(tmp_path / "local"))
    assert res.returncode == 0, res.stderr
    res, wd = prepare_at(tmp_path, "az-prep", "az://pool/data/", env=azurite.env())
    assert res.returncode == 0, res.stderr
    same_outputs(local, wd)

    # listed, then replaced on the server: the read names the listed ETag and is refused
    files = list_pool(PoolSpec(uri="az://pool/data/*.parquet"))
    assert [f.name for f in files] == ["az://pool/data/part-000.parquet", "az://pool/data/part-001.parquet"]
    cc.upload_blob("data/part-001.parquet", paths[0].read_bytes(), overwrite=True)
    with pytest.raises(
        ArmlabError, match=r"az://pool/data/part-001\.parquet: changed on the server since it was listed"
    ):
        list(iter_columns(files[1], ["text"]))
