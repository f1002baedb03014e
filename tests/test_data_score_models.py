"""Where scorer models come from, through the real download code on loopback: a fastText .bin from
an http URL (downloaded once into the models cache, its signed-URL token never shown or
stored), a sequence classifier from the hub by `snapshot_download` against a local server that
answers the hub's model routes (HF_ENDPOINT), with HF_TOKEN never in any output or file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from armlab.data.score.run import score
from armlab.errors import ArmlabError
from armlab.spec import load_experiment
from http_util import HubServer, PoolServer
from score_util import demo_documents, make_bert, make_scored_pool, train_fasttext
from test_data_score_run import experiment

TOKEN = "sig-5ecret-d0-not-print"
HF_TOKEN = "hf_5ecretTokenNeverPrinted"


def all_text(root: Path) -> str:
    """Every file under `root` as text (bytes decoded loosely), for secret checks."""
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file())


@pytest.fixture
def pool_root(tmp_path: Path) -> Path:
    good, junk = demo_documents(n_junk=60)
    make_scored_pool(tmp_path / "pool", good[:150], junk[:30], files=1)
    (tmp_path / "models").mkdir()
    train_fasttext(tmp_path / "models" / "quality.bin", good[150:], junk[30:])
    return tmp_path


def test_fasttext_from_a_url_is_downloaded_once_and_its_token_never_shown(
    pool_root: Path, monkeypatch, capsys
) -> None:
    cache = pool_root / "cache"
    monkeypatch.setenv("ARMLAB_CACHE", str(cache))
    monkeypatch.setenv("MODEL_SIG", TOKEN)  # the secret comes from the environment
    with PoolServer(pool_root / "models") as server:
        url = f"{server.url}/quality.bin?token=$MODEL_SIG"
        scorers = f'[[scorers]]\nname = "ft"\nkind = "fasttext"\nmodel = "{url}"\nlabel = "__label__hq"\n'
        exp = load_experiment(experiment(pool_root, scorers))
        score(exp)
        (pool_root / "wd" / "scores" / "ft" / "manifest.json").unlink()  # a rerun resolves the model again
        score(exp)
        got = sum(h.sent for h in server.log.hits if h.method == "GET" and h.path.endswith("quality.bin"))
        size = (pool_root / "models" / "quality.bin").stat().st_size
        assert got == size, server.log.hits  # once: the rerun reused it
        bad = f'[[scorers]]\nname = "ft"\nkind = "fasttext"\nmodel = "{server.url}/nosuch.bin?token=$MODEL_SIG"\nlabel = "x"\n'
        with pytest.raises(ArmlabError, match=r"scorer 'ft': cannot download its model: http://127.0.0.1:\d+/nosuch.bin\?token=\*\*\* not found"):
            score(load_experiment(experiment(pool_root, bad, name="bad.toml")))
    m = json.loads((pool_root / "wd" / "scores" / "ft" / "manifest.json").read_text())
    assert m["model"]["ref"] == f"{server.url}/quality.bin" and m["model"]["source"] == m["model"]["ref"]
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err
    assert TOKEN not in all_text(pool_root / "wd") and TOKEN not in all_text(cache)
    assert not any(TOKEN in str(p) for p in cache.rglob("*"))


def test_hf_model_from_the_hub_scores_as_the_same_model_on_disk(pool_root: Path, tmp_path: Path) -> None:
    good, junk = demo_documents(n_junk=20)
    repo = make_bert(tmp_path / "repo", good[:100] + junk)
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# a model card (not downloaded)\n")
    scorers = f"""
[[scorers]]
name = "edu-hub"
kind = "hf"
model = "armlab/tiny-edu"
revision = "main"
max_length = 64

[[scorers]]
name = "edu-local"
kind = "hf"
model = "{repo}"
max_length = 64

[[scorers]]
name = "edu-missing"
kind = "hf"
model = "armlab/no-such-model"
"""
    exp_file = experiment(pool_root, scorers, name="hub.toml")
    with HubServer(repo, repo="armlab/tiny-edu", repo_type="model") as server:
        env = {
            **os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf"),
            "HF_TOKEN": HF_TOKEN, "HF_HUB_DISABLE_TELEMETRY": "1", "ARMLAB_CACHE": str(tmp_path / "cache"),
        }  # fmt: skip
        cmd = [sys.executable, "-c", "from armlab.cli import main; main()", "score", str(exp_file)]
        run = [*cmd, "--scorer", "edu-hub,edu-local", "--workers", "1", "--device", "cpu"]
        r = subprocess.run(run, capture_output=True, text=True, timeout=600, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        resolved = [h.path for h in server.log.hits if "/resolve/" in h.path]
        assert any(p.endswith("model.safetensors") for p in resolved) and not any(p.endswith("README.md") for p in resolved)
        missing = subprocess.run([*cmd, "--scorer", "edu-missing"], capture_output=True, text=True, timeout=300, env=env)
    scores = pool_root / "wd" / "scores"
    hub = pq.read_table(scores / "edu-hub" / "files" / "part-000.parquet")
    local = pq.read_table(scores / "edu-local" / "files" / "part-000.parquet")
    assert np.array_equal(hub.column("score").to_numpy(), local.column("score").to_numpy())  # same bytes of model
    m = json.loads((scores / "edu-hub" / "manifest.json").read_text())
    assert m["model"]["ref"] == "hub:armlab/tiny-edu@main" and m["model"]["source"] == f"hub:armlab/tiny-edu@{HubServer.COMMIT}"
    assert m["model"]["sha256"] == json.loads((scores / "edu-local" / "manifest.json").read_text())["model"]["sha256"]
    assert HF_TOKEN not in r.stdout + r.stderr + missing.stdout + missing.stderr
    assert HF_TOKEN not in all_text(pool_root / "wd")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr[-2000:]
    assert "armlab: error: scorer 'edu-missing': hub model 'armlab/no-such-model': not found (or private: set HF_TOKEN)" in missing.stderr
