"""Checkpoints under damage: a corrupt latest checkpoint is named and skipped (resume and loading
fall back to the newest intact one), and a full disk while saving is one line naming the path
and the bytes needed, with nothing half-written. Real runs (subprocesses) on the tiny experiment;
the full disk is a real small tmpfs (needs root/CAP_SYS_ADMIN to mount: skipped, saying so,
where mount is not allowed)."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
import torch

from armlab.errors import ArmlabError
from armlab.train import checkpoint
from armlab.train.checkpoint import load_model, save_checkpoint
from armlab.workdir import open_workdir, read_json
from train_util import ARM, armlab, build_workdir, experiment, train_losses

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def exp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_workdir(tmp_path_factory.mktemp("ckpt"))


def run_dir(exp_file: Path, run: str) -> Path:
    return open_workdir(experiment(exp_file), create=False).run_dir(ARM, run)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up ({r.stderr.strip() or 'mount failed'}); needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_truncated_latest_checkpoint_is_named_and_resume_falls_back(exp_file: Path) -> None:
    # checkpoints at 8 (save_every) and 14, 15, 16 (the last 3, which the final evaluation scores)
    quick = ("--device", "cpu", "--num-iterations", "16")
    r = armlab("train", str(exp_file), "--arm", ARM, *quick, "--run-name", "torn")
    assert r.returncode == 0, r.stderr[-2000:]
    d = run_dir(exp_file, "torn")
    before = train_losses(d)
    model_pt = checkpoint.checkpoint_dir(d, 16) / "model.pt"
    size = model_pt.stat().st_size
    with open(model_pt, "r+b") as f:  # what a copy cut short leaves behind
        f.truncate(size // 2)
    assert checkpoint.list_steps(d) == [8, 14, 15]
    model, meta = load_model(d)  # evaluation falls back too
    assert meta["step"] == 15 and not model.training

    r = armlab("train", str(exp_file), "--arm", ARM, *quick, "--run-name", "torn", "--resume")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert f"step_000016: model.pt is {size // 2:,} bytes, {size:,} when written" in out.replace("\n", "")
    assert "resumed from step 15" in out
    after = train_losses(d)
    assert [after[s] for s in range(1, 17)] == [
        before[s] for s in range(1, 17)
    ]  # the redo is bitwise the same
    assert checkpoint.list_steps(d) == [8, 14, 15, 16] and read_json(d / "state.json")["state"] == "done"

    # a damaged file torch cannot read at all is named too, not a traceback
    model_pt.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: passes the cheap checks
    meta_json = read_json(model_pt.parent / "meta.json")
    meta_json["files"]["model.pt"] = model_pt.stat().st_size
    (model_pt.parent / "meta.json").write_text(__import__("json").dumps(meta_json))
    with pytest.raises(
        ArmlabError, match=r"model.pt: corrupt checkpoint file .* delete .*step_000016 to fall back"
    ):
        load_model(d)


def test_disk_full_while_saving_names_the_path_and_the_bytes(exp_file: Path, tmp_path: Path) -> None:
    d = run_dir(exp_file, "full")
    with small_tmpfs(d / "checkpoints", "1m") as ckpts:
        r = armlab(
            "train",
            str(exp_file),
            "--arm",
            ARM,
            "--device",
            "cpu",
            "--num-iterations",
            "8",
            "--run-name",
            "full",
        )
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in r.stderr
        assert "Traceback" not in r.stdout  # the rank's traceback stays in train.log: only the line
        assert "Traceback" in (d / "train.log").read_text()
        assert (
            f"{ckpts}: disk full: a checkpoint needs ~" in err[0]
            and "bytes, " in err[0]
            and " free on that" in err[0]
        )
        assert not list(ckpts.iterdir())  # nothing half-written
        assert read_json(d / "state.json")["state"] == "failed"


def test_running_out_of_space_midway_is_cleaned_up_and_reported(tmp_path: Path, monkeypatch) -> None:
    """With the up-front check off (margin 0), the write itself hits ENOSPC on a 1 MB tmpfs."""
    from armlab.train.model import GPTConfig, build_model
    from armlab.train.optim import build_optimizer

    model = build_model(GPTConfig(depth=2, vocab_size=400, seq_len=64))
    opt = build_optimizer(
        model, embedding_lr=0.3, unembedding_lr=0.008, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.1
    )
    run = tmp_path / "run"
    with small_tmpfs(run / "checkpoints", "1m") as ckpts:
        monkeypatch.setattr(checkpoint, "DISK_MARGIN", 0.0)
        with pytest.raises(ArmlabError, match=rf"{ckpts}: disk full: a checkpoint needs ~"):
            save_checkpoint(run, 1, model=model, optimizer=opt, rank_states=[{}], meta={})
        assert not list(ckpts.iterdir())
    assert torch.isfinite(next(model.parameters())).all()
