"""A refused command changes nothing: every refusal below exits 2 with one line, and the workdir
hashes the same (every path and every byte) before and after it; on a fresh machine a refused
command leaves no workdir at all.

0.1 failed this: a refused `demo --num-iterations 5` and a refused `prepare --ratio` rewrote the
workdir's frozen experiment.toml (then `compare` refused all 4 good runs), and failed prepares
left experiment.toml/json behind. The commands run through the real entry point (`cli.main`) in
this process, so the ~20 refusals cost seconds; `test_refusals_need_no_torch` runs them in fresh
interpreters.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from armlab.cli import main
from armlab.data.prepare import prepare
from armlab.spec import load_experiment
from armlab.tokenizer import train_experiment_tokenizer
from data_util import experiment_toml, make_pool

TRAIN = """device_batch_size = 4
total_batch_size = 256
num_iterations = 3
eval_every = 3
eval_tokens = 1024
save_every = 3
warmup_steps = 1
allow_repeat = true"""


def tree_hash(root: Path) -> dict[str, str]:
    """Every path under `root` -> sha256 of its bytes ("dir" for a directory)."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refuse(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> str:
    """Run `armlab ARGS` through cli.main; it must exit 2 with one `armlab: error:` line."""
    monkeypatch.setattr(sys, "argv", ["armlab", *args])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2, (args, e.value.code, err)
    assert len(lines) == 1 and lines[0].startswith("armlab: error: "), (args, err)
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir as a user has it after `prepare`, `tokenizer` and one finished run (rand-s0)."""
    root = tmp_path_factory.mktemp("refusals")
    make_pool(root / "pool", n_docs=600, n_files=3)
    exp_file = root / "exp.toml"
    extra = {"train": TRAIN, "evaluate": 'core_bundle = "none"'}
    exp_file.write_text(experiment_toml(root / "wd", str(root / "pool" / "*.parquet"), **extra))
    exp = load_experiment(exp_file)
    prepare(exp)
    train_experiment_tokenizer(exp)
    r = subprocess.run(
        [sys.executable, "-c", "from armlab.cli import main; main()", "train", str(exp_file), "--arm", "rand",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return exp_file


def refusals(exp: str, root: Path) -> list[tuple[list[str], str]]:
    """(argv, a word the error line must hold) for refusals of a prepared, trained workdir."""
    wd = str(root / "wd")
    # the same experiment with another horizon: `run` would call rand-s0 "already done"
    longer = root / "longer.toml"
    longer.write_text(Path(exp).read_text().replace("num_iterations = 3", "num_iterations = 4"))
    slurm, nodes = root / "slurm.toml", root / "nodes.toml"  # [[hosts]] entries that cannot work
    slurm.write_text(Path(exp).read_text() + '[[hosts]]\nname = "c"\nscheduler = "slurm"\narms = ["rand"]\n')
    nodes.write_text(Path(exp).read_text() + '[[hosts]]\nname = "p"\nnodes = ["a", "b"]\narms = ["rand"]\n')
    odd = root / "odd.toml"  # a total batch no rank count splits: plan refuses what train would
    odd.write_text(Path(exp).read_text().replace("total_batch_size = 256", "total_batch_size = 1000"))
    # the pool dir holds the workdir: from the second prepare on it would read its own shards
    inside = root / "inside.toml"
    inside.write_text(Path(exp).read_text().replace(str(root / "pool" / "*.parquet"), str(root)))
    return [
        (["prepare", exp, "--arm", "nosuch"], "no arm named 'nosuch'"),
        (["prepare", exp, "--arm", "top", "--ratio", "0.35"], "--overwrite"),  # the arm exists, from ratio 0.2
        (["prepare", exp, "--ratio", "0.35"], "single --arm"),
        (["prepare", exp, "--arm", "top", "--ratio", "1.5"], "ratio"),
        (["prepare", exp, "--rows-per-shard", "100"], "--overwrite"),
        (["prepare", exp, "--executor", "ray", "--ray-address", dead_address()], "no Ray head answers there"),
        (["prepare", exp, "--executor", "cluster"], "use local or ray"),
        (["prepare", str(inside)], "is inside the pool dir"),
        (["tokenizer", wd + "/nosuch"], "nosuch"),
        (["train", exp, "--arm", "nosuch"], "no arm named 'nosuch'"),
        (["train", exp, "--arm", "rand"], "rand-s0"),  # done already
        (["train", exp, "--arm", "rand", "--depth", "3"], "rand-s0"),
        (["train", exp, "--arm", "top", "--total-batch-size", "100"], "total_batch_size"),
        (["train", exp, "--arm", "rand", "--num-gpus", "2", "--seed", "5"], "GPU"),
        (["train", exp, "--arm", "rand", "--seed", "5", "--nnodes", "2", "--node-rank", "0"], "--rdzv-endpoint"),
        (["train", exp, "--arm", "rand", "--seed", "5", "--num-iterations", str(10**30)], "num_iterations"),
        (["run", exp, "--num-gpus", "2"], "GPU"),
        (["run", str(longer), "--arm", "rand", "--seeds", "0"], "differs in train.num_iterations"),
        (["run", exp, "--max-seeds", "3"], "--max-seeds goes with --until-decided"),
        (["run", exp, "--until-decided", "--arm", "rand"], "leave out --arm"),
        (["evaluate", exp, "--arm", "nosuch"], "no arm named 'nosuch'"),
        (["compare", exp], "rand-s0: no final evaluation"),  # never compared by its in-training val bpb
        (["rm", exp, "--arm", "rand", "--run", "nosuch"], "nosuch"),
        # names that would leave their directory (0.2 trained `--run-name ../data` into the shard dir)
        *[(["train", exp, "--arm", "rand", "--run-name", bad], f"--run-name {bad!r} is not a valid name")
          for bad in ("../data", "../../x", "..", "a/b")],  # fmt: skip
        (["export", exp, "--arm", "rand", "--run", "../top", "--to", str(root / "x")], "--run '../top'"),
        (["rm", exp, "--arm", "rand", "--run", ".."], "--run '..'"),
        (["export", exp, "--arm", "top", "--to", str(root / "wd" / "export")], "top"),
        (["export", exp, "--arm", "rand", "--to", exp], "exp.toml"),
        (["plan", exp, "--mfu", "fast"], "--mfu"),
        (["plan", str(odd)], "train.total_batch_size = 1000 is not divisible"),
        (["launch", exp], "hosts"),
        (["launch", str(slurm)], "needs partition"),
        (["launch", str(nodes)], "master_port"),
        (["demo", "--workdir", wd], "belongs to experiment 'datatest'"),
        (["demo", "--workdir", wd, "--num-iterations", "5"], "belongs to experiment 'datatest'"),
        (["init", exp], "exists"),
        (["score", exp], "has no [[scorers]]"),
    ]


def test_refusals_leave_the_workdir_byte_for_byte(trained, capsys, monkeypatch) -> None:
    root = trained.parent
    before, spec_before = tree_hash(root / "wd"), trained.read_bytes()
    assert "experiment.toml" in before and any(k.endswith("rand-s0/run.json") for k in before)
    for argv, needle in refusals(str(trained), root):
        line = refuse(capsys, monkeypatch, *argv)
        assert needle in line, (argv, line)
        after = tree_hash(root / "wd")
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, (argv, line, changed)
    assert trained.read_bytes() == spec_before  # `init` over an existing file did not touch it


def test_refusals_on_a_fresh_machine_leave_no_workdir(tmp_path, capsys, monkeypatch) -> None:
    make_pool(tmp_path / "pool", n_docs=60, n_files=1)
    exp = tmp_path / "exp.toml"
    wd = tmp_path / "wd"
    exp.write_text(experiment_toml(wd, str(tmp_path / "pool" / "*.parquet")))
    scored = tmp_path / "scored.toml"  # a scorer whose model is not there; an arm on a scorer not run yet
    scorer = '\n[[scorers]]\nname = "ft"\nkind = "fasttext"\nmodel = "/nowhere/q.bin"\nlabel = "__label__hq"\n'
    scored.write_text(experiment_toml(wd, str(tmp_path / "pool" / "*.parquet")) + scorer)
    scored_arm = tmp_path / "scored_arm.toml"
    top = '\n[[arms]]\nname = "ft-top"\nkind = "top"\nratio = 0.2\nscore = "ft"\n'
    scored_arm.write_text(experiment_toml(wd, str(tmp_path / "pool" / "*.parquet")) + scorer + top)
    missing = tmp_path / "missing.toml"
    missing.write_text(experiment_toml(wd, str(tmp_path / "nosuch" / "*.parquet")))
    for argv, needle in [
        (["prepare", str(missing)], "nosuch"),  # the pool is not there
        (["prepare", str(exp), "--arm", "nosuch"], "no arm named 'nosuch'"),
        (["prepare", str(exp), "--arm", "top", "--ratio", "2"], "ratio"),
        (["prepare", str(exp), "--executor", "ray", "--ray-address", dead_address()], "--ray-address"),
        (["tokenizer", str(exp)], "prepare"),
        (["train", str(exp), "--arm", "rand"], "not prepared"),
        (["evaluate", str(exp)], ""),
        (["launch", str(exp)], "hosts"),
        (["demo", "--workdir", str(tmp_path / "demo"), "--num-iterations", "0"], "--num-iterations"),
        (["score", str(exp), "--scorer", "edu"], "has no [[scorers]]"),
        (["score", str(scored)], "scorer 'ft': model '/nowhere/q.bin' not found"),
        (["prepare", str(scored_arm)], "arm 'ft-top' selects on scorer 'ft', which has not scored the pool"),
    ]:
        line = refuse(capsys, monkeypatch, *argv)
        assert needle in line, (argv, line)
        assert not wd.exists() and not (tmp_path / "demo").exists(), (argv, line, sorted(tmp_path.rglob("*")))


def dead_address() -> str:
    """A loopback host:port where nothing listens (no Ray head there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))
        return f"127.0.0.2:{s.getsockname()[1]}"


def test_prepare_on_ray_without_ray_installed_is_refused(trained, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    before = tree_hash(trained.parent / "wd")
    line = refuse(capsys, monkeypatch, "prepare", str(trained), "--executor", "ray")
    assert "pip install 'armlab[ray]'" in line and "--executor local" in line, line
    assert tree_hash(trained.parent / "wd") == before


def test_refusals_need_no_torch(trained) -> None:
    """Refusals that read only the spec and the workdir answer without importing torch (~2 s of a
    2-core box's start-up; `python bench/cli.py` times them). One fresh interpreter runs them all."""
    probe = """
import sys
from armlab.cli import main
for argv in sys.argv[1].split("|"):
    sys.argv = ["armlab", *argv.split()]
    try:
        main()
    except SystemExit as e:
        assert e.code == 2, (argv, e.code)
    assert "torch" not in sys.modules, argv
print("ok")
"""
    exp, wd = str(trained), str(trained.parent / "wd")
    argvs = [
        f"train {exp} --arm nosuch",
        f"train {exp} --arm top --engine nanogpt",
        f"prepare {exp} --arm top --ratio 0.35",
        f"run {exp} --arm nosuch",
        f"evaluate {exp} --arm nosuch",
        f"compare {exp}",
        f"plan {exp} --mfu fast",
        f"rm {wd} --arm rand --run nosuch",
        f"train {exp} --arm rand --run-name ../data",
        f"launch {exp}",
        f"score {exp}",
    ]
    r = subprocess.run([sys.executable, "-c", probe, "|".join(argvs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
