"""The experiment file: every bad input is one ArmlabError line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.spec import fingerprint_diff, load_experiment, parse_experiment, with_overrides

BASE = """
name = "t"
[pool]
uri = "/data/pool"
[[arms]]
name = "r"
kind = "random"
ratio = 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(text)
    return p


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ArmlabError) as e:
        load_experiment(write(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_example_loads(repo_root: Path) -> None:
    exp = load_experiment(repo_root / "examples" / "fineweb-edu-top-vs-random.toml")
    assert [a.name for a in exp.arms] == ["random16.5", "edu-top16.5"]
    assert exp.arm("random16.5").seed == 42 and exp.shards.rows_per_shard == 14000
    assert (
        exp.model.depth == 26 and exp.train.device_batch_size == 32 and exp.train.total_batch_size == 524288
    )


def test_unknown_key_named(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + "\n[shards]\nrows_per_shrad = 10\n")
    assert "unknown key 'shards.rows_per_shrad'" in msg


def test_wrong_type_named(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE.replace("ratio = 0.5", 'ratio = "half"'))
    assert "arms[0].ratio" in msg


@pytest.mark.parametrize("ratio", ["0", "1.5", "-0.1"])
def test_ratio_range(tmp_path: Path, ratio: str) -> None:
    msg = error_of(tmp_path, BASE.replace("ratio = 0.5", f"ratio = {ratio}"))
    assert "arms[0].ratio" in msg and "(0, 1]" in msg


def test_duplicate_arm(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + '[[arms]]\nname = "r"\nkind = "random"\nratio = 0.1\n')
    assert "duplicate arm name(s): r" in msg


@pytest.mark.parametrize("name", ["eval", "tokenizer"])
def test_arm_names_of_prepares_own_targets_are_reserved(tmp_path: Path, name: str) -> None:
    msg = error_of(tmp_path, BASE.replace('name = "r"', f'name = "{name}"'))
    assert "arms[0].name" in msg and f"arm name {name!r} is reserved" in msg


def test_report_group_column(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, BASE + '[report]\ngroup_column = "dump"\n'))
    assert exp.report.group_column == "dump"
    assert load_experiment(write(tmp_path, BASE)).report.group_column is None


def test_prepare_executor(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, BASE + '[prepare]\nexecutor = "ray"\nray_address = "10.0.0.1:6379"\n'))
    assert (exp.prepare.executor, exp.prepare.ray_address) == ("ray", "10.0.0.1:6379")
    assert exp.fingerprint() == load_experiment(write(tmp_path, BASE)).fingerprint()  # where, not what
    assert "prepare.executor" in error_of(tmp_path, BASE + '[prepare]\nexecutor = "slurm"\n')
    assert "prepare.workers" in error_of(tmp_path, BASE + "[prepare]\nworkers = 0\n")


def test_missing_pool(tmp_path: Path) -> None:
    msg = error_of(tmp_path, 'name = "t"\n[[arms]]\nname = "r"\nkind = "random"\nratio = 0.5\n')
    assert "missing required key 'pool'" in msg


def test_kind_needs_fields(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + '[[arms]]\nname = "top"\nkind = "top"\nratio = 0.1\n')
    assert "needs score_column" in msg
    msg = error_of(tmp_path, BASE + '[[arms]]\nname = "pb"\nkind = "prebuilt"\n')
    assert "needs uri" in msg


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    assert "invalid TOML" in error_of(tmp_path, "name = ")
    with pytest.raises(ArmlabError, match="not found"):
        load_experiment(tmp_path / "nope.toml")


def test_crlf_file_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "exp.toml"
    p.write_bytes(BASE.replace("\n", "\r\n").encode())
    assert load_experiment(p).name == "t"


def test_host_unknown_arm(tmp_path: Path) -> None:
    msg = error_of(tmp_path, BASE + '[[hosts]]\nname = "a"\nssh = "u@a"\narms = ["zzz"]\n')
    assert "unknown arm 'zzz'" in msg


def test_fingerprint_ignores_arm_and_seeds_but_not_model() -> None:
    a = parse_experiment(
        {"name": "t", "pool": {"uri": "p"}, "arms": [{"name": "r", "kind": "random", "ratio": 0.5}]}
    )
    b = parse_experiment(
        {
            "name": "t",
            "pool": {"uri": "p"},
            "arms": [{"name": "x", "kind": "random", "ratio": 0.1}],
            "train": {"seeds": [3, 4]},
        }
    )
    c = parse_experiment(
        {
            "name": "t",
            "pool": {"uri": "p"},
            "arms": [{"name": "r", "kind": "random", "ratio": 0.5}],
            "model": {"depth": 4},
        }
    )
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    assert fingerprint_diff(a.comparability(), c.comparability()) == ["model.depth"]


def test_recipe_fields_default_to_the_engine_and_are_checked(tmp_path: Path) -> None:
    from armlab.train import recipe

    exp = parse_experiment({"name": "x", "pool": {"uri": "p"}, "arms": [{"name": "r", "kind": "random", "ratio": 0.5}]})
    assert exp.model.window_pattern is None and exp.train.matrix_lr is None and exp.train.warmup_steps is None
    assert exp.train.param_data_ratio == 12  # nanochat 92d63d4's horizon
    hp = recipe.resolve(exp.train)
    assert (hp.embedding_lr, hp.unembedding_lr, hp.matrix_lr, hp.scalar_lr, hp.weight_decay) == (0.3, 0.008, 0.02, 0.5, 0.28)
    assert (hp.warmup_steps, hp.warmdown_ratio, hp.final_lr_frac) == (40, 0.65, 0.05)
    assert recipe.resolve(exp.train.model_copy(update={"matrix_lr": 0.01})).matrix_lr == 0.01
    assert "window_pattern: must be a non-empty string of S" in error_of(tmp_path, BASE + '[model]\nwindow_pattern = "SXL"\n')
    assert parse_experiment({**exp.model_dump(), "model": {"window_pattern": "ssl"}}).model.window_pattern == "SSL"
    assert "unknown key 'train.warmup_ratio'" in error_of(tmp_path, BASE + "[train]\nwarmup_ratio = 0.1\n")
    assert "train.warmup_steps" in error_of(tmp_path, BASE + "[train]\nwarmup_steps = -1\n")


def test_overrides_reach_any_section_one_arm_and_reset_the_horizon(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, BASE + "[train]\nnum_iterations = 10\n"))
    eff = with_overrides(exp, {"tokens": 50_000, "eval.docs": 7, "depth": None, "arms.r.ratio": 0.25})
    assert eff.train.tokens == 50_000 and eff.train.num_iterations is None and eff.eval.docs == 7
    assert eff.model.depth == exp.model.depth  # None: not given
    assert eff.arm("r").ratio == 0.25 and exp.arm("r").ratio == 0.5  # a new spec; the old one unchanged
    assert eff.fingerprint() != exp.fingerprint() or eff.comparability() != exp.comparability()
    assert with_overrides(exp, {"depth": None}) is exp  # nothing given: the same spec
    with pytest.raises(ArmlabError, match=r"unknown overrides dept, nosuch.x"):
        with_overrides(exp, {"dept": 3, "nosuch.x": 1})
    with pytest.raises(ArmlabError, match=r"command-line overrides: unknown key 'eval.doccs'"):
        with_overrides(exp, {"eval.doccs": 3})
    with pytest.raises(ArmlabError, match=r"train.engine: Input should be 'builtin' or 'nanochat'"):
        with_overrides(exp, {"engine": "nanogpt"})
    with pytest.raises(ArmlabError, match=r"no arm named 'x'"):
        with_overrides(exp, {"arms.x.ratio": 0.1})
    with pytest.raises(ArmlabError, match=r"arms\[0\].ratio"):
        with_overrides(exp, {"arms.r.ratio": 1.5})


SCORER = """
[[scorers]]
name = "ft"
kind = "fasttext"
model = "/models/quality.bin"
label = "__label__hq"
"""


@pytest.mark.parametrize(
    "extra,needle",
    [
        ('[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\nscore = "fx"\n', "arm 't': score 'fx' names no scorer (scorers: ft)"),
        ('[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\nscore = "ft"\nscore_column = "s"\n', "set score_column or score, not both"),
        ('[[arms]]\nname = "t"\nkind = "random"\nratio = 0.1\nscore = "ft"\n', "kind 'random' takes no score_column or score"),
        ('[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\n', "needs score_column (a pool column) or score (a scorer's name)"),
        ('[[scorers]]\nname = "ft"\nkind = "head"\nmodel = "h.npz"\ncolumn = "e"\n', "duplicate scorer name(s): ft"),
        ('[[scorers]]\nname = "a/b"\nkind = "head"\nmodel = "h.npz"\ncolumn = "e"\n', "scorer name 'a/b' is not a valid name"),
        ('[[scorers]]\nname = "x"\nkind = "fasttext"\nmodel = "m.bin"\n', "kind 'fasttext' needs label"),
        ('[[scorers]]\nname = "x"\nkind = "head"\nmodel = "h.npz"\n', "kind 'head' needs column"),
        ('[[scorers]]\nname = "x"\nkind = "hf"\nmodel = "o/m"\ncolumn = "e"\n', "column is only for kind 'head'"),
        ('[[scorers]]\nname = "x"\nkind = "head"\nmodel = "h.npz"\ncolumn = "e"\nrevision = "main"\n', "revision is only for kind 'hf'"),
        ('[[scorers]]\nname = "x"\nkind = "bert"\nmodel = "o/m"\n', "scorers[1].kind"),
        ('[[scorers]]\nname = "x"\nkind = "hf"\nmodel = "o/m"\nmax_lenght = 5\n', "did you mean 'max_length'?"),
    ],
)
def test_scorers_and_arms_on_them_are_checked(tmp_path: Path, extra: str, needle: str) -> None:
    assert needle in error_of(tmp_path, BASE + SCORER + extra)


def test_scorers_do_not_change_fingerprints_or_selections(tmp_path: Path) -> None:
    """Adding [[scorers]] and `score` left every existing fingerprint and selection as it was."""
    from armlab.data.prepare import arm_selection

    plain = load_experiment(write(tmp_path, BASE + '[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\nscore_column = "s"\n'))
    scored = load_experiment(write(tmp_path, BASE + SCORER + '[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\nscore_column = "s"\n'))
    assert plain.fingerprint() == scored.fingerprint()
    assert "score" not in arm_selection(plain, plain.arm("t")) and "scorer" not in arm_selection(plain, plain.arm("t"))
    on = load_experiment(write(tmp_path, BASE + SCORER + '[[arms]]\nname = "t"\nkind = "top"\nratio = 0.1\nscore = "ft"\n'))
    sel = arm_selection(on, on.arm("t"))
    assert sel["score"] == "ft" and sel["scorer"] == {"kind": "fasttext", "model": "/models/quality.bin", "label": "__label__hq"}
    assert on.scores_path == on.workdir_path / "scores"
    moved = with_overrides(on, {"score.scores_dir": str(tmp_path / "shared")})
    assert moved.scores_path == tmp_path / "shared" and moved.fingerprint() == on.fingerprint()
    with pytest.raises(ArmlabError, match=r"no scorer named 'ftt' .*did you mean 'ft'"):
        on.scorer("ftt")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("matrix_lr = inf", "train.matrix_lr: Input should be a finite number"),
        ("embedding_lr = nan", "train.embedding_lr: Input should be a finite number"),
        ("scalar_lr = 1e6", "train.scalar_lr: Input should be less than or equal to 10"),
        ("weight_decay = inf", "train.weight_decay: Input should be a finite number"),
        ("num_iterations = 1000000000000000000000000000000", "train.num_iterations: Input should be less than or equal to 1000000000"),
        ("tokens = 100000000000000000000", "train.tokens: Input should be less than or equal to"),
        ("target_param_data_ratio = inf", "train.target_param_data_ratio: Input should be a finite number"),
        ("warmup_steps = 10000000000", "train.warmup_steps: Input should be less than or equal to 1000000000"),
    ],
)
def test_recipe_numbers_are_finite_and_bounded(tmp_path: Path, line: str, message: str) -> None:
    """Issue 20: `matrix_lr = inf` and `num_iterations = 10**30` were accepted; the first trained
    NaNs to the end, the second planned a run that never ends."""
    assert message in error_of(tmp_path, BASE + f"[train]\n{line}\n")
    exp = load_experiment(write(tmp_path, BASE))
    with pytest.raises(ArmlabError, match=r"num_iterations: Input should be less than or equal"):
        with_overrides(exp, {"num_iterations": 10**30})  # the --num-iterations flag too


def test_data_seeds_pair_with_seeds_by_position(tmp_path: Path) -> None:
    exp = load_experiment(write(tmp_path, BASE + "[train]\nseeds = [0, 1, 2]\ndata_seeds = [10, 11, 12]\n"))
    assert [exp.train.data_seed(s) for s in (0, 1, 2)] == [10, 11, 12]
    assert load_experiment(write(tmp_path, BASE)).train.data_seed(1) == 1  # unset: a seed is both
    plain = load_experiment(write(tmp_path, BASE + "[train]\nseeds = [0, 1, 2]\n"))
    assert exp.fingerprint() == plain.fingerprint()  # like seeds, they vary between runs, not arms
    msg = error_of(tmp_path, BASE + "[train]\nseeds = [0, 1]\ndata_seeds = [5]\n")
    assert "train.data_seeds has 1 entries, train.seeds 2" in msg and "pair by position" in msg
    assert "distinct" in error_of(tmp_path, BASE + "[train]\nseeds = [0, 1]\ndata_seeds = [5, 5]\n")
