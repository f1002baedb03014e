"""`armlab launch` / `setup` with engine nanochat: each host trains with its own checkout."""

from __future__ import annotations

import tomllib

from armlab.ops.hosts import host_experiment_toml
from armlab.spec import parse_experiment


def test_each_host_gets_its_own_checkout_path():
    exp = parse_experiment(
        {
            "name": "remote-nanochat",
            "pool": {"uri": "/pool"},
            "arms": [
                {"name": "top", "kind": "random", "ratio": 0.5},
                {"name": "rand", "kind": "random", "ratio": 0.5},
            ],
            "train": {"engine": "nanochat"},
            "nanochat": {"path": "~/nanochat", "extra_args": ["--fp8"]},
            "hosts": [
                {"name": "gpu-a", "ssh": "u@a", "arms": ["top"], "nanochat": "~/src/nanochat-patched"},
                {"name": "gpu-b", "ssh": "u@b", "arms": ["rand"], "master_port": 29501},
            ],
        }
    )
    a = tomllib.loads(host_experiment_toml(exp, exp.hosts[0]))
    b = tomllib.loads(host_experiment_toml(exp, exp.hosts[1]))
    assert a["nanochat"]["path"] == "~/src/nanochat-patched"  # expanded by the host, not here
    assert b["nanochat"]["path"] == "~/nanochat"  # the experiment's default checkout
    assert a["nanochat"]["extra_args"] == b["nanochat"]["extra_args"] == ["--fp8"]
    assert a["train"]["engine"] == "nanochat" and "hosts" not in a
    # the host's experiment is the same experiment: the checkout path is not in the fingerprint
    assert parse_experiment(a).fingerprint() == parse_experiment(b).fingerprint() == exp.fingerprint()
