"""Names that become paths (armlab.names): `../data`, `../../x`, `..`, `a/b` are refused where they
enter (the spec, the flags) and where they become paths (the workdir), one line each.

0.2 accepted `armlab train --run-name ../data`: the run wrote its checkpoints and logs into the
arm's shard dir. The CLI side (refused, workdir byte-for-byte unchanged) is in
tests/test_cli_refusals.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.names import check_name
from armlab.ops.lanes import LaneFiles
from armlab.spec import parse_experiment
from armlab.workdir import Workdir

ESCAPES = ["../data", "../../x", "..", ".", "a/b", "/abs", "a\\b", ".hidden", "", "x" * 101]


@pytest.mark.parametrize("bad", ESCAPES)
def test_check_name_refuses_every_escape_in_one_line(bad: str) -> None:
    with pytest.raises(ArmlabError) as e:
        check_name(bad, "--run-name")
    msg = str(e.value)
    assert msg.startswith(f"--run-name {bad!r} is not a valid name") and "\n" not in msg
    if "/" in bad or bad in ("..", "."):
        assert "it would leave its directory" in msg


@pytest.mark.parametrize("good", ["rand-s0", "exp-top16-d26-8gpu", "edu-top16.5", "a..b", "A_1", "x" * 100])
def test_ordinary_names_pass(good: str) -> None:
    assert check_name(good, "run name") == good


def test_the_workdir_refuses_a_name_that_escapes(tmp_path: Path) -> None:
    """The last line of defence: a path builder given `../data` refuses instead of pointing at
    the arm's shard dir."""
    wd = Workdir(tmp_path)
    assert wd.run_dir("rand", "rand-s0") == tmp_path / "arms" / "rand" / "runs" / "rand-s0"
    for arm, run in (("rand", "../data"), ("rand", "../../x"), ("rand", ".."), ("rand", "a/b"), ("..", "r")):
        with pytest.raises(ArmlabError, match="is not a valid name"):
            wd.run_dir(arm, run)
    with pytest.raises(ArmlabError, match="arm name '../eval'"):
        wd.data_dir("../eval")
    with pytest.raises(ArmlabError, match="host name '../x'"):
        _ = LaneFiles(tmp_path / "lanes", "../x", 0).queue


BASE = {
    "name": "t",
    "pool": {"uri": "/data/pool"},
    "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
}


@pytest.mark.parametrize(
    ("where", "patch", "what"),
    [
        ("name", {"name": "../x"}, "experiment name"),
        ("arms[0].name", {"arms": [{"name": "../data", "kind": "random", "ratio": 0.5}]}, "arm name"),
        ("arms[0].name", {"arms": [{"name": "a/b", "kind": "random", "ratio": 0.5}]}, "arm name"),
        ("hosts[0].name", {"hosts": [{"name": "..", "ssh": "u@h", "arms": ["r"]}]}, "host name"),
    ],
)
def test_spec_names_are_checked_by_the_same_rule(where: str, patch: dict, what: str) -> None:
    with pytest.raises(ArmlabError) as e:
        parse_experiment({**BASE, **patch}, "exp.toml")
    msg = str(e.value)
    assert msg.startswith(f"exp.toml: {where}: {what} ") and "is not a valid name" in msg, msg
