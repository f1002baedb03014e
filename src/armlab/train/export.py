"""`armlab export`: a run's checkpoint as a nanochat base dir, so a winning arm's model goes on to
nanochat's own evaluation, SFT and chat (nanochat 92d63d4's checkpoint layout).

    DIR/base_checkpoints/d<depth>/model_<step:06d>.pt   the state dict (nanochat's parameter names)
    DIR/base_checkpoints/d<depth>/meta_<step:06d>.json  step, val_bpb, model_config (nanochat's
                                                        GPTConfig kwargs), user_config, batch sizes
    DIR/tokenizer/tokenizer.pkl, token_bytes.pt         the experiment's tokenizer (nanochat's files)
    DIR/armlab_export.json                              where it came from (experiment, arm, run, step)

nanochat's `checkpoint_manager.load_model("base", ...)` with NANOCHAT_BASE_DIR=DIR loads it
unchanged. The optimiser state is not exported (nanochat's is sharded per rank, and SFT starts
a fresh one). DIR must be new, empty, or an earlier export; the export is written beside it
and renamed into place, so a failure leaves DIR as it was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from armlab.errors import ArmlabError
from armlab.spec import Experiment
from armlab.train import checkpoint, recipe
from armlab.train.model import GPTConfig
from armlab.workdir import open_workdir, read_json, step_lock

MARKER = "armlab_export.json"
TOKENIZER_FILES = ("tokenizer.pkl", "token_bytes.pt")


def _check_target(to: Path) -> None:
    if to.exists() and not to.is_dir():
        raise ArmlabError(f"--to {to}: exists and is not a directory; pick a new directory")
    if to.is_dir():
        entries = sorted(p.name for p in to.iterdir())
        if entries and MARKER not in entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise ArmlabError(
                f"--to {to}: not empty (holds {shown}) and not an armlab export; export into a new or empty directory"
            )
    parent = to.parent
    if not parent.is_dir():
        raise ArmlabError(f"--to {to}: parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (to.is_dir() and not os.access(to, os.W_OK)):
        raise ArmlabError(f"--to {to}: {parent if not to.is_dir() else to} is not writable")


def nanochat_meta(step: int, cfg: GPTConfig, ckpt_meta: dict[str, Any], exp: Experiment) -> dict[str, Any]:
    """meta_<step>.json as nanochat's base_train writes it (the fields its scripts read)."""
    run_cfg = ckpt_meta.get("config", {})
    hp = recipe.resolve(exp.train)
    return {
        "step": step,
        "val_bpb": ckpt_meta.get("val_bpb"),
        "model_config": cfg.nanochat_config(),
        "user_config": {  # nanochat's chat_sft inherits the learning rates from here
            "depth": cfg.depth,
            "aspect_ratio": cfg.aspect_ratio,
            "head_dim": cfg.head_dim,
            "max_seq_len": cfg.seq_len,
            "window_pattern": cfg.window_pattern,
            "embedding_lr": hp.embedding_lr,
            "unembedding_lr": hp.unembedding_lr,
            "matrix_lr": hp.matrix_lr,
            "scalar_lr": hp.scalar_lr,
            "weight_decay": hp.weight_decay,
            "warmup_steps": hp.warmup_steps,
            "warmdown_ratio": hp.warmdown_ratio,
            "final_lr_frac": hp.final_lr_frac,
            "num_iterations": run_cfg.get("num_iterations"),
        },
        "device_batch_size": run_cfg.get("device_batch_size"),
        "max_seq_len": cfg.seq_len,
        "total_batch_size": run_cfg.get("total_batch_size"),
    }


def export_run(
    exp: Experiment, arm: str, to: str | Path, seed: int | None = None, run: str | None = None
) -> Path:
    """Write the run's latest intact checkpoint to `to` as a nanochat base dir; returns the
    checkpoint file written. Refuses bad input (one ArmlabError line) before writing anything."""
    exp.arm(arm)  # unknown arm: names the arms
    wd = open_workdir(exp, create=False)
    run = run or exp.run_name(arm, exp.train.seeds[0] if seed is None else seed)
    run_dir = wd.run_dir(arm, run)
    if not (run_dir / "run.json").is_file():
        have = sorted(p.name for p in wd.runs_dir(arm).glob("*") if (p / "run.json").is_file())
        raise ArmlabError(
            f"arm {arm!r} has no run {run!r} (runs: {', '.join(have) or 'none'}); pass --run NAME or --seed S"
        )
    step = checkpoint.resolve_step(run_dir, None)
    ckpt = checkpoint.checkpoint_dir(run_dir, step)
    ckpt_meta = read_json(ckpt / "meta.json")
    if "window_pattern" not in ckpt_meta.get("model_config", {}):
        raise ArmlabError(
            f"{ckpt}: written by an older armlab (before the nanochat 92d63d4 recipe); retrain it"
        )
    cfg = GPTConfig(**ckpt_meta["model_config"])
    tok_dir = wd.tokenizer_dir
    missing = [n for n in TOKENIZER_FILES if not (tok_dir / n).is_file()]
    if missing:
        raise ArmlabError(f"{tok_dir}: no {', '.join(missing)}; run `armlab tokenizer EXP` first")
    tok_fp = read_json(tok_dir / "manifest.json").get("fingerprint")
    if tok_fp != ckpt_meta.get("tokenizer_fingerprint"):
        raise ArmlabError(
            f"{run_dir}: trained with tokenizer {ckpt_meta.get('tokenizer_fingerprint')}, the experiment's is now "
            f"{tok_fp}; the model cannot be exported with it"
        )
    to = Path(to).expanduser().absolute()
    _check_target(to)  # before the lock: a refused export leaves the workdir as it was
    with step_lock(wd, "export", wait=False):  # two exports of one workdir at once are a mistake
        _check_target(to)  # again: another export may have written it meanwhile
        state = checkpoint.load_state(ckpt / "model.pt")

        tmp = to.parent / f".{to.name}.armlab-export-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tag_dir = tmp / "base_checkpoints" / f"d{cfg.depth}"
            tag_dir.mkdir(parents=True)
            torch.save(state, tag_dir / f"model_{step:06d}.pt")
            meta = nanochat_meta(step, cfg, ckpt_meta, exp)
            (tag_dir / f"meta_{step:06d}.json").write_text(json.dumps(meta, indent=2))
            (tmp / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                shutil.copy2(tok_dir / name, tmp / "tokenizer" / name)
            source = {"experiment": exp.name, "arm": arm, "run": run, "step": step, "run_dir": str(run_dir),
                      "fingerprint": ckpt_meta.get("fingerprint"), "tokenizer_fingerprint": tok_fp}  # fmt: skip
            (tmp / MARKER).write_text(json.dumps(source, indent=2))
            if to.exists():  # empty, or an earlier export: swap it out
                old = to.parent / f".{to.name}.armlab-export-old-{os.getpid()}"
                os.replace(to, old)
                os.replace(tmp, to)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, to)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArmlabError(f"--to {to}: cannot write the export ({e.strerror or e})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return to / "base_checkpoints" / f"d{cfg.depth}" / f"model_{step:06d}.pt"
