"""`armlab export`: a trained run as a nanochat base dir, loaded by nanochat 92d63d4's own
checkpoint_manager (from the shared snapshot) and giving the same logits as armlab's model."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from armlab.errors import ArmlabError
from armlab.train.checkpoint import load_model
from armlab.train.export import export_run
from armlab.workdir import open_workdir
from reference_util import nanochat
from train_util import ARM, armlab, build_workdir, experiment

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp_file = build_workdir(tmp_path_factory.mktemp("export"))
    r = armlab(
        "train", str(exp_file), "--arm", ARM, "--device", "cpu", "--num-iterations", "8", "--run-name", "win"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return exp_file


def test_nanochat_loads_the_export_and_agrees(trained: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "nanochat-base"
    r = armlab("export", str(trained), "--arm", ARM, "--run", "win", "--to", str(out))
    assert r.returncode == 0, r.stderr
    written = Path(r.stdout.strip().splitlines()[-1])
    assert written == out / "base_checkpoints" / "d2" / "model_000008.pt" and written.is_file()
    assert (out / "base_checkpoints" / "d2" / "meta_000008.json").is_file()
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == ["token_bytes.pt", "tokenizer.pkl"]

    nc = nanochat()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(out))  # nanochat's get_tokenizer() reads it per call
    model, tokenizer, meta = nc.checkpoint_manager.load_model_from_dir(
        str(out / "base_checkpoints"), torch.device("cpu"), phase="eval"
    )
    assert meta["step"] == 8 and meta["model_config"]["window_pattern"] == "SSSL"
    ours, _ = load_model(open_workdir(experiment(trained), create=False).run_dir(ARM, "win"))
    text = "Return a new dictionary initialized from an optional positional argument."
    ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
    assert ids[1:] == ours_tok(trained).encode([text], prepend_bos=False)[0]  # the same tokenizer
    x = torch.tensor([ids[:64]])
    with torch.no_grad():
        diff = (model(x) - ours(x)).abs().max().item()
    print(f"\nexport: nanochat's checkpoint_manager loads step 8; max |logit diff| vs armlab {diff:.3g}")
    assert diff <= 1e-5
    # nanochat's bits-per-byte table is the experiment's
    assert torch.equal(nc.tokenizer.get_token_bytes(), torch.as_tensor(ours_tok(trained).token_bytes))


def ours_tok(exp_file: Path):
    from armlab.tokenizer import load_experiment_tokenizer

    return load_experiment_tokenizer(experiment(exp_file))


def test_bad_input_is_one_line_and_writes_nothing(trained: Path, tmp_path: Path) -> None:
    exp = experiment(trained)
    target = tmp_path / "out"
    with pytest.raises(ArmlabError, match="no arm named 'nope'"):
        export_run(exp, "nope", target)
    with pytest.raises(ArmlabError, match=r"arm 'rand' has no run 'ghost' \(runs: win\)"):
        export_run(exp, ARM, target, run="ghost")
    with pytest.raises(ArmlabError, match="has no run 'rand-s7'"):
        export_run(exp, ARM, target, seed=7)
    # a run that has not written a checkpoint yet
    wd = open_workdir(exp, create=False)
    fresh = wd.run_dir(ARM, "fresh")
    fresh.mkdir(parents=True)
    (fresh / "run.json").write_text((wd.run_dir(ARM, "win") / "run.json").read_text())
    with pytest.raises(ArmlabError, match="no complete checkpoint; train the run first"):
        export_run(exp, ARM, target, run="fresh")
    # a directory holding something else
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ArmlabError, match=r"not empty \(holds notes.txt\) and not an armlab export"):
        export_run(exp, ARM, foreign, run="win")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(ArmlabError, match="parent directory .* does not exist"):
        export_run(exp, ARM, tmp_path / "no" / "such" / "dir", run="win")
    assert not target.exists() and not [p for p in tmp_path.iterdir() if "armlab-export" in p.name]
    # through the CLI: exit 2, one line, no traceback
    r = armlab("export", str(trained), "--arm", ARM, "--run", "ghost", "--to", str(target))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    # an earlier export is replaced; an empty dir is filled
    target.mkdir()
    export_run(exp, ARM, target, run="win")
    first = (target / "armlab_export.json").stat().st_mtime_ns
    export_run(exp, ARM, target, run="win")
    assert (target / "armlab_export.json").stat().st_mtime_ns >= first
    assert not [p for p in tmp_path.iterdir() if "armlab-export" in p.name]


def test_a_read_only_target_is_refused(trained: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True
    )
    if r.returncode != 0:  # as root every plain directory is writable: a read-only mount is the real case
        pytest.skip(f"cannot mount a read-only tmpfs ({r.stderr.strip() or 'mount failed'}); needs root")
    try:
        assert not os.access(ro, os.W_OK)
        with pytest.raises(ArmlabError, match=r"--to .*/ro/out: .*/ro is not writable"):
            export_run(experiment(trained), ARM, ro / "out", run="win")
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
