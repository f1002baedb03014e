"""`armlab plan` refuses what `train` and `launch` would refuse, naming the key in the file (0.2
priced a total batch no rank count could split, and train later blamed `--total-batch-size`, a
flag the user never typed); it warns when the schedule does not fit the horizon, suggesting only
keys to set that are unset, and to lower those that are set; its numbers follow the trained
tokenizer's vocabulary once it exists."""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.plan_checks import check_plan, gpus_to_price, plan_budget
from armlab.spec import Experiment, parse_experiment


def exp(tmp_path: Path, train: dict | None = None, hosts: list | None = None) -> Experiment:
    return parse_experiment(
        {
            "name": "p", "workdir": str(tmp_path / "wd"), "pool": {"uri": "p"},
            "arms": [{"name": "a", "kind": "random", "ratio": 0.5}],
            "model": {"depth": 2, "max_seq_len": 64},
            "train": {"device_batch_size": 4, "num_iterations": 100, **(train or {})},
            "hosts": hosts or [],
        }
    )  # fmt: skip


def refusal(e: Experiment, gpus: int | None = None) -> str:
    budget, _, _ = plan_budget(e)
    with pytest.raises(ArmlabError) as err:
        check_plan(e, budget, gpus)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_batch_the_ranks_cannot_split_is_refused_naming_the_key_in_the_file(tmp_path: Path) -> None:
    one = refusal(exp(tmp_path, {"total_batch_size": 1000}))
    assert one.startswith("train.total_batch_size = 1000 is not divisible by device_batch_size x max_seq_len")
    assert "--total-batch-size" not in one  # the user never typed that flag
    assert refusal(exp(tmp_path, {"total_batch_size": 1024}), gpus=3).startswith(
        "--gpus 3: train.total_batch_size = 1024 is not divisible"
    )
    cpu_host = {"name": "c", "ssh": "u@h", "arms": ["a"], "device": "cpu", "nproc": 3}
    assert refusal(exp(tmp_path, {"total_batch_size": 1024}, [cpu_host])).startswith(
        "host 'c' runs 3 rank(s) per run (nproc): train.total_batch_size = 1024 is not divisible"
    )
    auto = refusal(exp(tmp_path, {"device_batch_size": 3}))  # the auto batch is a power of two
    assert auto.startswith("the automatic total batch size") and "(train.total_batch_size is unset)" in auto


def test_gpu_rows_are_priced_on_gpus_that_split_the_batch(tmp_path: Path) -> None:
    """A CPU pilot's 2,048-token batch cannot be split by 8 GPUs: the GPU rows use the most of a
    node's 8 that can (2), instead of a count train would refuse."""
    e = exp(tmp_path, {"total_batch_size": 512})  # 4 x 64 x 2
    budget, _, _ = plan_budget(e)
    assert gpus_to_price(e, budget, None) == 2 and gpus_to_price(e, budget, 1) == 1
    node = exp(tmp_path, {"total_batch_size": 4096})  # 8 x 4 x 64 x 2: a node splits it
    assert gpus_to_price(node, plan_budget(node)[0], None) == 8


def test_a_schedule_that_does_not_fit_is_warned_with_keys_to_set_or_to_lower(tmp_path: Path) -> None:
    budget, _, _ = plan_budget(unset := exp(tmp_path, {"total_batch_size": 256}))
    (w,) = check_plan(unset, budget)
    assert "does not fit 100 steps: warmup 40 + warmdown 65" in w
    assert "set train.warmup_steps to <= 35 or set train.warmdown_ratio to <= 0.60" in w
    set_ = exp(tmp_path, {"total_batch_size": 256, "warmup_steps": 40, "warmdown_ratio": 0.65})
    (w,) = check_plan(set_, budget)
    assert "lower train.warmup_steps (40) to <= 35 or lower train.warmdown_ratio (0.65) to <= 0.60" in w
    assert "set train." not in w  # never suggests setting a key the file already sets
    assert check_plan(exp(tmp_path, {"total_batch_size": 256, "warmup_steps": 5}), budget) == []


@pytest.mark.e2e
def test_plan_uses_the_trained_tokenizers_vocabulary(tmp_path: Path) -> None:
    """A sample too small for the vocabulary asked stops the merges early: the model's embeddings
    (and so its size, FLOPs and auto batch) follow the vocabulary trained, not the one asked."""
    from armlab.data.prepare import prepare
    from armlab.spec import load_experiment
    from armlab.tokenizer import Tokenizer, train_experiment_tokenizer
    from data_util import experiment_toml, make_pool

    make_pool(tmp_path / "pool", n_docs=300, n_files=1)
    f = tmp_path / "exp.toml"
    f.write_text(experiment_toml(tmp_path / "wd", str(tmp_path / "pool")).replace("vocab_size = 512", "vocab_size = 4096"))
    e = load_experiment(f)
    budget, vocab, source = plan_budget(e)
    assert vocab == 4096 and source.startswith("tokenizer.vocab_size")
    prepare(e)
    train_experiment_tokenizer(e)
    trained = Tokenizer.load(tmp_path / "wd" / "tokenizer").vocab_size
    assert trained < 4096
    budget2, vocab2, source2 = plan_budget(e)
    assert (vocab2, source2) == (trained, "the trained tokenizer's") and budget2.params.total < budget.params.total
