"""Spec errors that say what the user meant: "did you mean" for a typo'd key (difflib over the
model's own fields, at any depth) or arm, and the smallest vocab the tokenizer can really build."""

from __future__ import annotations

import pytest

from armlab.errors import ArmlabError
from armlab.spec import parse_experiment
from armlab.vocab import MIN_VOCAB_SIZE


def spec(**sections) -> dict:
    base = {"name": "x", "pool": {"uri": "p"}, "arms": [{"name": "rand", "kind": "random", "ratio": 0.5}]}
    return {**base, **sections}


@pytest.mark.parametrize(
    "data, needle",
    [
        (spec(shards={"rows_per_shrad": 3}), "unknown key 'shards.rows_per_shrad': did you mean 'rows_per_shard'?"),
        (spec(arms=[{"name": "t", "kind": "top", "ratio": 0.5, "score_column": "s", "tempreature": 2}]),
         "unknown key 'arms[0].tempreature': did you mean 'temperature'?"),
        (spec(train={"num_iteration": 5}), "unknown key 'train.num_iteration': did you mean 'num_iterations'?"),
        (spec(hosts=[{"name": "h", "ssh": "h", "arms": ["rand"], "num_gpu": 1}]),
         "unknown key 'hosts[0].num_gpu': did you mean 'num_gpus'?"),
        # a typo'd section is also a missing one: the typo is named, it is the cause
        ({"name": "x", "pol": {"uri": "p"}, "arms": [{"name": "r", "kind": "random", "ratio": 0.5}]},
         "unknown key 'pol': did you mean 'pool'?"),
        (spec(model={"xyzzy": 1}), "unknown key 'model.xyzzy': check its spelling"),
    ],
)  # fmt: skip
def test_typo_gets_did_you_mean(data: dict, needle: str) -> None:
    with pytest.raises(ArmlabError) as e:
        parse_experiment(data, "exp.toml")
    assert needle in str(e.value) and "examples/fineweb-edu-top-vs-random.toml" in str(e.value)


def test_unknown_arm_did_you_mean() -> None:
    exp = parse_experiment(spec())
    with pytest.raises(ArmlabError, match=r"no arm named 'rnad' in experiment 'x' \(did you mean 'rand'\? arms: rand\)"):
        exp.arm("rnad")


def test_vocab_minimum_is_the_tokenizers() -> None:
    with pytest.raises(ArmlabError, match=f"tokenizer.vocab_size: .*{MIN_VOCAB_SIZE}"):
        parse_experiment(spec(tokenizer={"vocab_size": 260}), "exp.toml")  # 0.1 let this through
    with pytest.raises(ArmlabError):
        parse_experiment(spec(tokenizer={"vocab_size": MIN_VOCAB_SIZE - 1}), "exp.toml")
    assert parse_experiment(spec(tokenizer={"vocab_size": MIN_VOCAB_SIZE})).tokenizer.vocab_size == MIN_VOCAB_SIZE


def test_vocab_minimum_trains(tmp_path) -> None:
    """The smallest vocab the spec accepts is one the real tokenizer trains (no merges at all)."""
    from tok_util import trained_tokenizer

    tok = trained_tokenizer(tmp_path, vocab_size=MIN_VOCAB_SIZE)
    assert tok.vocab_size == MIN_VOCAB_SIZE
