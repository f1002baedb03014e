"""The experiment file -> base_train flags, against the real parsers of both nanochat commits.

The flag sets come from tests/data/nanochat/base_train_help_<commit>.txt: the verbatim output of
`python -m scripts.base_train --help` at each commit (the real --help is run by the checkout
tests). Every flag the mapping can emit is checked against them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.spec import parse_experiment
from armlab.train.engines.nanochat_checkout import parse_help
from armlab.train.engines.nanochat_flags import RECIPE_FLAGS, RUN_FLAGS, fingerprinted, run_args, spec_args

DATA = Path(__file__).parent / "data" / "nanochat"
FLAGS = {c: parse_help((DATA / f"base_train_help_{c}.txt").read_text()) for c in ("48804bf", "92d63d4")}


def exp(train: dict | None = None, model: dict | None = None, **sections):
    return parse_experiment(
        {
            "name": "flags",
            "pool": {"uri": "/nowhere"},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
            "model": {"depth": 2, "max_seq_len": 128, **(model or {})},
            "train": {
                "engine": "nanochat",
                "device_batch_size": 4,
                "eval_every": 5,
                "eval_tokens": 4096,
                "save_every": 10,
                **(train or {}),
            },  # fmt: skip
            **sections,
        }
    )


def as_dict(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv)


def test_every_flag_armlab_drives_exists_at_both_commits():
    always = {"--depth", "--max-seq-len", "--aspect-ratio", "--head-dim", "--device-batch-size",
              "--target-param-data-ratio", "--eval-every", "--eval-tokens", "--save-every",
              "--core-metric-max-per-task", *RUN_FLAGS}  # fmt: skip
    for commit, flags in FLAGS.items():
        assert always <= flags, (commit, always - flags)
    recipe = set(RECIPE_FLAGS.values())
    assert recipe - FLAGS["92d63d4"] == set()  # every recipe field has a flag in current nanochat
    assert recipe - FLAGS["48804bf"] == {"--warmup-steps"}  # 48804bf warms up by ratio instead


@pytest.mark.parametrize("commit", ["48804bf", "92d63d4"])
def test_defaults_pass_the_plan_and_leave_the_recipe_to_the_checkout(commit):
    args = as_dict(spec_args(exp(), FLAGS[commit], commit))
    assert args == {
        "--depth": "2", "--max-seq-len": "128", "--aspect-ratio": "64", "--head-dim": "128",
        "--device-batch-size": "4", "--target-param-data-ratio": "12.0", "--eval-every": "5",
        "--eval-tokens": "4096", "--save-every": "10",
    }  # fmt: skip
    assert not set(args) & set(RECIPE_FLAGS.values())  # None = the checkout's own default


def test_set_recipe_fields_are_passed():
    e = exp(
        train={"matrix_lr": 0.03, "warmup_steps": 10, "warmdown_ratio": 0.5}, model={"window_pattern": "L"}
    )
    args = as_dict(spec_args(e, FLAGS["92d63d4"], "92d63d4"))
    assert (args["--matrix-lr"], args["--warmup-steps"], args["--warmdown-ratio"]) == ("0.03", "10", "0.5")
    assert args["--window-pattern"] == "L"


def test_a_field_the_checkout_lacks_is_refused_naming_field_and_commit():
    with pytest.raises(ArmlabError) as e:
        spec_args(exp(train={"warmup_steps": 10}), FLAGS["48804bf"], "48804bf")
    msg = str(e.value)
    assert "nanochat 48804bf's scripts.base_train has no flag for train.warmup_steps (--warmup-steps)" in msg
    assert "\n" not in msg


def test_horizon_given_as_steps_or_tokens_passes_no_ratio():
    for train in ({"num_iterations": 7}, {"tokens": 100_000}):
        assert "--target-param-data-ratio" not in as_dict(
            spec_args(exp(train=train), FLAGS["92d63d4"], "92d63d4")
        )
    ratio = as_dict(spec_args(exp(train={"target_param_data_ratio": 20}), FLAGS["48804bf"], "48804bf"))
    assert ratio["--target-param-data-ratio"] == "20.0"


def test_extra_args_are_checked_against_the_parser():
    ok = exp(nanochat={"extra_args": ["--sample-every=-1", "--fp8"]})
    assert "--fp8" not in spec_args(ok, FLAGS["92d63d4"], "92d63d4")  # checked here, appended by the engine
    with pytest.raises(
        ArmlabError, match=r"extra_args '--adam-beta1=0.9': nanochat 92d63d4's .* has no --adam-beta1"
    ):
        spec_args(exp(nanochat={"extra_args": ["--adam-beta1=0.9"]}), FLAGS["92d63d4"], "92d63d4")
    spec_args(exp(nanochat={"extra_args": ["--adam-beta1=0.9"]}), FLAGS["48804bf"], "48804bf")
    with pytest.raises(ArmlabError, match=r"armlab sets --depth itself"):
        spec_args(exp(nanochat={"extra_args": ["--depth=4"]}), FLAGS["48804bf"], "48804bf")
    with pytest.raises(ArmlabError, match=r"armlab sets --num-iterations itself"):
        spec_args(exp(nanochat={"extra_args": ["--num-iterations", "9"]}), FLAGS["48804bf"], "48804bf")


def test_run_args_and_fingerprint():
    base = dict(total_batch_size=1024, num_iterations=12, device="cpu", run="r-s0", model_tag="r-s0")
    quiet = run_args(**base, wandb=False, core_bundle=False, resume_step=None)
    assert quiet == ["--total-batch-size=1024", "--num-iterations=12", "--run=dummy", "--model-tag=r-s0",
                     "--device-type=cpu", "--core-metric-every=-1"]  # fmt: skip
    logged = run_args(**base, wandb=True, core_bundle=True, resume_step=8)
    assert (
        "--run=r-s0" in logged and "--resume-from-step=8" in logged and "--core-metric-every=-1" not in logged
    )
    spec = spec_args(exp(evaluate={"max_per_task": 50}), FLAGS["92d63d4"], "92d63d4")
    assert "--save-every=10" in spec and "--core-metric-max-per-task=50" in spec
    assert not {"--save-every=10", "--core-metric-max-per-task=50"} & set(fingerprinted(spec))


@pytest.mark.parametrize("commit", ["48804bf", "92d63d4"])
def test_the_playbook_example_maps_onto_both_commits(commit, repo_root):
    from armlab.spec import load_experiment

    e = load_experiment(repo_root / "examples" / "playbook-nanochat.toml")
    assert e.train.engine == "nanochat" and e.hosts[0].nanochat == "~/nanochat"
    args = as_dict(spec_args(e, FLAGS[commit], commit))
    assert (args["--depth"], args["--device-batch-size"], args["--target-param-data-ratio"]) == (
        "26",
        "32",
        "10.5",
    )
