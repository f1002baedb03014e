"""nanochat 92d63d4 as the reference implementation: imported from the team's shared snapshot
(`../shared/nanochat/92d63d4/` beside the repo), never copied into the project.

Only the modules the parity tests need are imported (gpt, optim, flash_attention, loss_eval,
dataloader, checkpoint_manager, tokenizer); they need nothing beyond armlab's own dependencies
(torch, numpy, pyarrow, rustbpe, tiktoken, requests, filelock, psutil). `scripts/base_train.py`
is not importable (it trains at import and needs wandb), so `base_train_namespace` executes the
script's own statements that compute the hyperparameters, selected from its syntax tree.
"""

from __future__ import annotations

import ast
import math
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nanochat_util import snapshots_root

REPO = Path(__file__).resolve().parents[1]

COMMIT = "92d63d4"
NANOCHAT = snapshots_root() / COMMIT  # ARMLAB_NANOCHAT_SNAPSHOTS, else ../shared/nanochat
MODULES = ("common", "gpt", "optim", "flash_attention", "loss_eval", "dataset", "dataloader",
           "tokenizer", "checkpoint_manager")  # fmt: skip

_imported: SimpleNamespace | None = None


def nanochat() -> SimpleNamespace:
    """nanochat's modules from the snapshot (skips, saying why, where the snapshot is absent)."""
    global _imported
    if _imported is not None:
        return _imported
    if not (NANOCHAT / "nanochat" / "gpt.py").is_file():
        pytest.skip(f"nanochat {COMMIT} snapshot not found at {NANOCHAT} (the team's ../shared fixtures)")
    # nanochat.dataset resolves its data dir at import: point it at a scratch base dir, not ~/.cache
    os.environ["NANOCHAT_BASE_DIR"] = tempfile.mkdtemp(prefix="nanochat-base-")
    for name in [m for m in sys.modules if m == "nanochat" or m.startswith("nanochat.")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(NANOCHAT)):
            del sys.modules[name]  # another snapshot imported earlier in this session
    sys.path.insert(0, str(NANOCHAT))
    try:
        import importlib

        mods = {m: importlib.import_module(f"nanochat.{m}") for m in MODULES}
    finally:
        sys.path.remove(str(NANOCHAT))
    _imported = SimpleNamespace(**mods, base_dir=Path(os.environ["NANOCHAT_BASE_DIR"]))
    return _imported


# -- scripts/base_train.py's own hyperparameter computation ---------------------------------------
FUNCTIONS = ("build_model_meta", "get_scaling_params", "get_lr_multiplier", "get_muon_momentum",
             "get_weight_decay")  # fmt: skip


def _source(node: ast.stmt) -> str:
    return ast.unparse(node)


def _assigns(node: ast.stmt, name: str) -> bool:
    targets = node.targets if isinstance(node, ast.Assign) else []
    return any(isinstance(t, ast.Name) and t.id == name for t in targets)


def _is_parser_stmt(node: ast.stmt) -> bool:
    if _assigns(node, "parser"):
        return True
    call = node.value if isinstance(node, ast.Expr) else None
    return (
        isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and isinstance(call.func.value, ast.Name)
        and call.func.value.id == "parser"
    )


def base_train_namespace(argv: list[str], vocab_size: int) -> dict[str, Any]:
    """Run base_train.py's own code for these command-line flags, up to the optimiser, on meta tensors.

    Executed from the script's syntax tree, in its order: the argparse block; the functions
    build_model_meta, get_scaling_params and the three schedules; every top-level statement from
    `param_counts = model.num_scaling_params()` to `optimizer = model.setup_optimizer(...)`
    (horizon, auto batch size, lr and weight-decay scaling, the optimiser's groups); the
    num_iterations block; the grad-accumulation lines. The model is built on the meta device by
    the script's own build_model_meta. Returns the script's namespace (args, model,
    total_batch_size, batch_lr_scale, weight_decay_scaled, optimizer, num_iterations, ...).
    """
    nc = nanochat()
    tree = ast.parse((NANOCHAT / "scripts" / "base_train.py").read_text())
    body = tree.body
    parser = [n for n in body if _is_parser_stmt(n)]
    funcs = {n.name: n for n in body if isinstance(n, ast.FunctionDef) and n.name in FUNCTIONS}
    missing = set(FUNCTIONS) - set(funcs)
    assert not missing, f"base_train.py no longer defines {missing}: update the parity test"
    first = next(i for i, n in enumerate(body) if _assigns(n, "param_counts"))
    last = next(i for i, n in enumerate(body) if _assigns(n, "optimizer"))
    horizon = next(
        n
        for n in body
        if isinstance(n, ast.If)
        and "num_iterations" in _source(n.body[0])
        and "args.num_iterations" in _source(n.test)
    )
    accum = [
        n
        for n in body
        if any(_assigns(n, v) for v in ("tokens_per_fwdbwd", "world_tokens_per_fwdbwd", "grad_accum_steps"))
    ]

    ns: dict[str, Any] = {
        "argparse": __import__("argparse"), "math": math, "torch": __import__("torch"),
        "GPT": nc.gpt.GPT, "GPTConfig": nc.gpt.GPTConfig, "print0": lambda *a, **k: None,
        "vocab_size": vocab_size, "ddp_world_size": 1,
    }  # fmt: skip
    exec(compile(ast.Module(parser, []), "base_train.py:argparse", "exec"), ns)
    ns["args"] = ns["parser"].parse_args(argv)
    exec(compile(ast.Module(list(funcs.values()), []), "base_train.py:functions", "exec"), ns)
    ns["model"] = ns["build_model_meta"](ns["args"].depth)
    exec(compile(ast.Module(body[first : last + 1], []), "base_train.py:scaling", "exec"), ns)
    exec(compile(ast.Module([horizon, *accum], []), "base_train.py:horizon", "exec"), ns)
    return ns
