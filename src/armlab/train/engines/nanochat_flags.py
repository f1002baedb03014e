"""The experiment file -> `scripts.base_train` flags, for the checkout's own version.

armlab plans the run (model, batch, horizon: `budget.training_budget`) exactly as for its own
trainer and tells nanochat every number it planned, so the token budget armlab checks (repeat
refusal, `plan`, status' ETA) is the one nanochat trains:

    model.depth / max_seq_len / aspect_ratio / head_dim   --depth --max-seq-len --aspect-ratio --head-dim
    train.device_batch_size                                --device-batch-size
    the resolved total batch (auto when unset)             --total-batch-size
    the resolved horizon (ratio / tokens / iterations)     --num-iterations
    train.target_param_data_ratio when it is the horizon   --target-param-data-ratio (nanochat scales
                                                            weight decay by the ratio's token target)
    train.eval_every / eval_tokens / save_every            --eval-every --eval-tokens --save-every

Recipe fields default to None, "the engine's default": the flag is not passed and the
checkout's own default applies (so 48804bf keeps its warmup ratio 0, 92d63d4 its 40 warmup
steps). A field the user sets is passed, and when the checkout has no flag for it (e.g.
`train.warmup_steps` on 48804bf, which only has --warmup-ratio) the run is refused with one line
naming the field and the commit: never silently dropped.

Run control: `--run=dummy` (W&B off) unless `train.wandb_project` is set, `--model-tag`,
`--device-type`, `--core-metric-every=-1` when the run has no CORE bundle (nanochat would
download its own), `--resume-from-step`. `[nanochat] extra_args` come last, verbatim; a flag
the checkout lacks, or one armlab sets itself, is refused.

`spec_args` (what the experiment file decides, checked once when the engine is configured) and
`run_args` (this run's resolved numbers and control flags) together are the command line; the
spec part enters the run's fingerprint with the commit and diff hash.
"""

from __future__ import annotations

from typing import Any

from armlab.errors import ArmlabError
from armlab.spec import Experiment

# spec field -> base_train flag, for the recipe fields passed only when set (None = engine default)
RECIPE_FLAGS = {
    "model.window_pattern": "--window-pattern",
    "train.embedding_lr": "--embedding-lr",
    "train.unembedding_lr": "--unembedding-lr",
    "train.matrix_lr": "--matrix-lr",
    "train.scalar_lr": "--scalar-lr",
    "train.weight_decay": "--weight-decay",
    "train.warmup_steps": "--warmup-steps",
    "train.warmdown_ratio": "--warmdown-ratio",
    "train.final_lr_frac": "--final-lr-frac",
}
# Flags armlab always passes for the run at hand (values from the plan, not the spec alone).
RUN_FLAGS = ("--total-batch-size", "--num-iterations", "--run", "--model-tag", "--device-type",
             "--core-metric-every", "--resume-from-step")  # fmt: skip
# Spec flags that do not change what is trained (like save_every in the spec's comparability).
NOT_FINGERPRINTED = ("--save-every", "--core-metric-max-per-task")


def _value(v: Any) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def _spec_value(exp: Experiment, dotted: str) -> Any:
    section, name = dotted.split(".")
    return getattr(getattr(exp, section), name)


def flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def spec_args(exp: Experiment, flags: frozenset[str], commit: str) -> list[str]:
    """The flags the experiment file decides (the same for every arm and every host), checked
    against the checkout's parser: a field it has no flag for is refused, naming field and commit.
    The resolved batch and horizon are `run_args`'s; `[nanochat] extra_args` are checked here too."""
    m, t = exp.model, exp.train
    given: list[tuple[str, str, Any]] = [  # (spec field, flag, value)
        ("model.depth", "--depth", m.depth),
        ("model.max_seq_len", "--max-seq-len", m.max_seq_len),
        ("model.aspect_ratio", "--aspect-ratio", m.aspect_ratio),
        ("model.head_dim", "--head-dim", m.head_dim),
        ("train.device_batch_size", "--device-batch-size", t.device_batch_size),
    ]
    if t.tokens is None and t.num_iterations is None:
        given.append(("train.target_param_data_ratio", "--target-param-data-ratio", t.param_data_ratio))
    given += [(f, flag, v) for f, flag in RECIPE_FLAGS.items() if (v := _spec_value(exp, f)) is not None]
    given += [
        ("train.eval_every", "--eval-every", t.eval_every),
        ("train.eval_tokens", "--eval-tokens", t.eval_tokens),
        ("train.save_every", "--save-every", t.save_every),
    ]
    if exp.evaluate.max_per_task is not None:
        given.append(("evaluate.max_per_task", "--core-metric-max-per-task", exp.evaluate.max_per_task))
    lacking = [f"{field} ({flag})" for field, flag, _ in given if flag not in flags]
    if lacking:
        raise ArmlabError(
            f"nanochat {commit}'s scripts.base_train has no flag for {', '.join(lacking)}: remove "
            f"{'it' if len(lacking) == 1 else 'them'} from the experiment file (the checkout's default then "
            "applies) or train with a nanochat checkout that has the flag"
        )
    missing = [f for f in RUN_FLAGS if f not in flags]
    if missing:
        raise ArmlabError(
            f"nanochat {commit}'s scripts.base_train has no {', '.join(missing)}, which armlab needs to drive it; "
            "use a nanochat checkout from 2026 or later"
        )
    argv = [f"{flag}={_value(v)}" for _, flag, v in given]
    ours = {flag_name(a) for a in argv} | set(RUN_FLAGS)
    for a in exp.nanochat.extra_args:
        name = flag_name(a)
        if name in ours:
            raise ArmlabError(
                f"[nanochat] extra_args {a!r}: armlab sets {name} itself (from the experiment file); set the "
                "spec field instead, so every arm gets it and the fingerprint records it"
            )
        if name.startswith("--") and name not in flags:
            raise ArmlabError(
                f"[nanochat] extra_args {a!r}: nanochat {commit}'s scripts.base_train has no {name} "
                "(see `python -m scripts.base_train --help` in the checkout)"
            )
    return argv


def fingerprinted(args: list[str]) -> list[str]:
    """The flags that change what is trained (for the run's fingerprint)."""
    return [a for a in args if flag_name(a) not in NOT_FINGERPRINTED]


def run_args(
    *,
    total_batch_size: int,
    num_iterations: int,
    device: str,
    run: str,
    model_tag: str,
    wandb: bool,
    core_bundle: bool,
    resume_step: int | None,
) -> list[str]:
    """The flags of this one run: the resolved batch and horizon, and how it is driven (W&B
    run name or `dummy`, checkpoint dir, device, CORE off without a bundle, resume step)."""
    args = [
        f"--total-batch-size={total_batch_size}",
        f"--num-iterations={num_iterations}",
        f"--run={run if wandb else 'dummy'}",
        f"--model-tag={model_tag}",
        f"--device-type={device}",
    ]
    if not core_bundle:
        args.append("--core-metric-every=-1")  # else nanochat downloads its own bundle at the last step
    if resume_step is not None:
        args.append(f"--resume-from-step={resume_step}")
    return args
