"""The nanochat engine end to end: real nanochat (48804bf and 92d63d4) trains armlab arms on CPU.

Every run goes through the real CLI (`armlab train / status / evaluate / compare`), nanochat's
unmodified `scripts.base_train` (eager: `train.compile = false` sets TORCHDYNAMO_DISABLE=1),
depth 2, sequence 128, a handful of steps. See nanochat_util for the interpreter nanochat runs
with and why these tests skip only where the team's nanochat snapshots are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from armlab.evaluate.bundle import write_bundle
from armlab.runs import read_metrics, read_state
from armlab.spec import load_experiment
from armlab.train.engines.nanochat_layout import BaseDir, checkpoint_steps, val_texts
from armlab.workdir import open_workdir, read_lease
from nanochat_exp_util import ARMS, build_template, copy_workdir, write_experiment
from nanochat_util import bare_python, copy_checkout, nanochat_python, snapshot
from tok_util import write_shards
from train_util import armlab, spawn, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """One --help cache for the module; no W&B; the snapshots must exist (else: skip, saying why)."""
    for c in ("48804bf", "92d63d4"):
        snapshot(c)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARMLAB_CACHE", str(tmp_path_factory.mktemp("armlab-cache")))
        mp.setenv("WANDB_MODE", "disabled")
        yield


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, list[str]]:
    return build_template(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def python() -> Path:
    return nanochat_python()


def tiny_bundle(dest: Path) -> Path:
    """A 2-task CORE bundle in DCLM's format (what base_eval reads from <base dir>/eval_bundle)."""
    mc = [
        {"query": f"Question {i}: which word is a colour?", "choices": ["red", "table"], "gold": 0}
        for i in range(6)
    ]
    lm = [{"context": f"One two three {i}", "continuation": " four"} for i in range(6)]
    tasks = [
        {"label": "colour_mc", "icl_task_type": "multiple_choice", "num_fewshot": 0, "random_baseline": 50.0, "items": mc},
        {"label": "count_lm", "icl_task_type": "language_modeling", "num_fewshot": 1, "random_baseline": 0.0, "items": lm},
    ]  # fmt: skip
    return write_bundle(dest, tasks, name="tiny")


def run_dir(exp_file: Path, arm: str) -> Path:
    return open_workdir(load_experiment(exp_file), create=False).run_dir(arm, f"{arm}-s0")


def ok(*args: str, **kw) -> subprocess.CompletedProcess:
    p = armlab(*map(str, args), **kw)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def refused(*args: str) -> str:
    """The one line a refused command prints (exit 2, no traceback)."""
    p = armlab(*map(str, args))
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("armlab: error: ") and "Traceback" not in p.stderr, (
        p.stderr
    )
    return lines[0]


def steps(run: Path, key: str) -> list[int]:
    return [m["step"] for m in read_metrics(run).records if m.get(key) is not None]


def test_two_arms_at_both_commits_then_compare_refuses_to_mix_them(tmp_path, template, python):
    tpl, eval_docs = template
    bundle = tiny_bundle(tmp_path / "bundle")
    exps = {}
    for commit, git in (("48804bf", False), ("92d63d4", True)):  # a plain snapshot and a git clone
        root = tmp_path / commit
        ck = copy_checkout(commit, root / "nanochat", git=git)
        # 48804bf's experiment names a CORE bundle: nanochat runs CORE at its last step on it
        core = f'[evaluate]\ncore_bundle = "{bundle}"\nmax_per_task = 4\n' if commit == "48804bf" else ""
        exps[commit] = exp = write_experiment(root, copy_workdir(tpl, root / "wd"), ck, python, sections=core)
        for arm in ARMS:
            ok("train", exp, "--arm", arm)
            run = run_dir(exp, arm)
            assert steps(run, "train_loss") == list(range(1, 9))  # every step, once
            assert steps(run, "val_bpb") == [0, 4, 8]  # at eval_every and the last step
            assert read_state(run)["state"] == "done"
            assert val_texts(BaseDir.of_run(run)) == eval_docs  # validated on exactly the shared docs
            info = json.loads((run / "run.json").read_text())
            assert info["engine"]["engine"] == "nanochat" and info["engine"]["git"] is git
            assert info["engine_comparable"]["commit"] == info["engine"]["commit"]
            assert checkpoint_steps(BaseDir.of_run(run).checkpoints("d2"), 1) == [4, 8]
            assert steps(run, "core") == ([8] if core else [])  # "Step 00008 | CORE metric: ..."
        status = ok("status", exp).stdout
        lines = [ln.split() for ln in status.splitlines()]
        header = next(cols for cols in lines if cols[:2] == ["arm", "run"])  # columns by name, not position
        rows = [dict(zip(header, cols, strict=False)) for cols in lines if cols[1:2] in (["alt-s0"], ["rand-s0"])]
        assert len(rows) == 2 and all((r["state"], r["step"]) == ("done", "8/8") for r in rows), status
        assert (
            f"engine: nanochat {info['engine']['commit'][:7] if git else info['engine']['commit']}" in status
        )
        print(f"\n[{commit}] status:\n{status}")

    # evaluate: armlab scores nanochat's checkpoints itself (nanochat's model class, in this process):
    # whole-document val bpb over every eval byte, CORE with per-item scores; nanochat's own val bpb kept
    exp48 = exps["48804bf"]
    ok("evaluate", exp48)  # the experiment's bundle
    for arm in ARMS:
        ev = json.loads((run_dir(exp48, arm) / "eval.json").read_text())
        last = [m for m in read_metrics(run_dir(exp48, arm)).records if m.get("val_bpb") is not None][-1]
        assert ev["engine"]["nanochat_val_bpb"] == last["val_bpb"] and last["step"] == 8
        assert ev["bpb"]["coverage"] == 1.0 and ev["val_bpb_docs"] == len(eval_docs)
        assert len(ev["val_bpb_per_doc"]["nats"]) == len(eval_docs) and 1 < ev["val_bpb"] < 20
        assert ev["packed"]["coverage"] < 1.0  # nanochat's packed stream, the second number
        assert [c["checkpoint"]["step"] for c in ev["checkpoints"]] == [4, 8]  # the last k it saved
        assert set(ev["core_tasks"]) == {"colour_mc", "count_lm"} and -1 <= ev["core"] <= 1
        mc = ev["core_tasks"]["colour_mc"]
        assert mc["n"] == 4 and len(mc["correct"]) == len(mc["logprob"]) == len(mc["margin"]) == 4
        assert ev["bundle"]["name"] == "tiny"
        assert ev["core"] == pytest.approx(
            sum(t["centered"] for t in ev["core_tasks"].values()) / 2, abs=1e-5
        )
    # 92d63d4's runs were not evaluated: compare names them, never using nanochat's in-training val bpb
    line = refused("compare", exps["92d63d4"])
    assert "alt-s0: no final evaluation" in line and "rand-s0: no final evaluation" in line, line
    for commit, exp in [("48804bf", exp48)]:
        out = ok("compare", exp).stdout
        summary = json.loads(
            (open_workdir(load_experiment(exp), create=False).report_dir / "summary.json").read_text()
        )
        assert set(summary["arms"]) == set(ARMS) and out.startswith("rand vs alt on ") and "val bpb" in out.splitlines()[0]
        print(f"\n[{commit}] compare:\n{out}")
        md = (open_workdir(load_experiment(exp), create=False).report_dir / "report.md").read_text()
        print(md)
        assert "nanochat's fixed seed (42)" in md and "## Continuous CORE and signal-to-noise" in md

    # the 92d63d4 run of `rand` next to the 48804bf run of `alt`: refused, naming both commits
    mixed = run_dir(exp48, "rand")
    shutil.rmtree(mixed)
    shutil.copytree(run_dir(exps["92d63d4"], "rand"), mixed, symlinks=True)
    line = refused("compare", exp48)
    c48 = json.loads((run_dir(exp48, "alt") / "run.json").read_text())["engine"]["commit"]
    c92 = json.loads((mixed / "run.json").read_text())["engine"]["commit"]
    assert f"engine.commit ({c48} vs {c92})" in line, line


def test_two_seeds_read_the_arm_in_two_orders_and_train_differently(tmp_path, template, python):
    """nanochat has no seed flag and reads its files in sorted order, so seeds 0 and 1 used to train
    the same run; the run's base dir now links the arm's files in an order set by the data seed."""
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat")
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, train_extra="seeds = [0, 1]\n")
    wd = open_workdir(load_experiment(exp), create=False)
    runs = [wd.run_dir("alt", f"alt-s{seed}") for seed in (0, 1)]
    for seed in (0, 1):
        out = ok("train", exp, "--arm", "alt", "--seed", str(seed))
        assert f"data seed {seed}: nanochat reads 3 file(s)" in out.stderr and "fixed seed (42)" in out.stderr
    orders = [json.loads((BaseDir.of_run(r).data_dir() / "data_order.json").read_text()) for r in runs]
    assert [o["data_seed"] for o in orders] == [0, 1]
    assert orders[0]["files"][0] != orders[1]["files"][0]  # another first file: other data from step 1
    assert sorted(orders[0]["files"]) == sorted(orders[1]["files"])  # the same arm
    curves = [[m["train_loss"] for m in read_metrics(r).records if "train_loss" in m] for r in runs]
    print("\nnanochat 92d63d4, arm alt, train loss per step:")
    for seed, c in enumerate(curves):
        print(f"  seed {seed} (files {', '.join(orders[seed]['files'])}): " + " ".join(f"{x:.6f}" for x in c))
    assert len(curves[0]) == len(curves[1]) == 8
    # Another run: the curves part. Not at every step: nanochat prints losses to 6 decimals, and
    # while its head (std 0.001 at init) still gives near-uniform logits (loss ~ ln(vocab)) two data
    # orders can agree to that precision for the first steps (seen on Debian's Python 3.11.2 pool).
    assert curves[0] != curves[1] and curves[0][-1] != curves[1][-1]


def test_kill_9_of_a_detached_run_then_resume_finishes_from_nanochats_checkpoint(tmp_path, template, python):
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat")
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, steps=30, eval_every=10,
                           save_every=5)  # fmt: skip
    run = run_dir(exp, "alt")
    ckpts = BaseDir.of_run(run).checkpoints("d2")
    ok("train", exp, "--arm", "alt", "--detach")  # the supervisor runs on in its own session
    wait_for(
        lambda: checkpoint_steps(ckpts, 1) or read_state(run).get("state") == "done", 180, "a checkpoint"
    )
    supervisor = psutil.Process(int(read_state(run)["pid"]))
    ranks = supervisor.children(recursive=True)
    supervisor.kill()  # kill -9: no cleanup at all
    assert ranks, "nanochat was not running under the supervisor"
    gone, alive = psutil.wait_procs(ranks, timeout=30)  # PR_SET_PDEATHSIG takes nanochat down with it
    assert not alive
    saved = checkpoint_steps(ckpts, 1)
    assert saved and saved[-1] < 30, f"the run finished before the kill ({saved})"
    assert read_lease(run.parents[1] / "data") is not None  # the dead supervisor's lease is left behind

    ok("train", exp, "--arm", "alt", "--resume")
    log = (run / "train.log").read_text()
    assert f"Resuming optimization from step {saved[-1]}" in log
    assert steps(run, "train_loss") == list(range(1, 31))  # one uninterrupted run, each step once
    assert steps(run, "val_bpb") == [0, 10, 20, 30]
    assert read_state(run)["state"] == "done"
    assert read_lease(run.parents[1] / "data") is None  # released


def test_refusals_are_one_line_and_start_nothing(tmp_path, template, python):
    tpl, _ = template
    ck = copy_checkout("48804bf", tmp_path / "nanochat")
    wd = copy_workdir(tpl, tmp_path / "wd")

    def unchanged(line_of, exp):
        before = sorted(p.relative_to(wd) for p in wd.rglob("*"))
        line = line_of(exp)
        assert sorted(p.relative_to(wd) for p in wd.rglob("*")) == before  # nothing written
        assert not run_dir(exp, "alt").exists() and read_lease(wd / "arms" / "alt" / "data") is None
        return line

    exp = write_experiment(tmp_path, wd, ck, python)
    line = unchanged(lambda e: refused("train", e, "--arm", "alt", "--nanochat", tmp_path / "missing"), exp)
    assert f"nanochat checkout {tmp_path / 'missing'}: no such directory" in line
    (tmp_path / "not-nanochat").mkdir()
    line = unchanged(
        lambda e: refused("train", e, "--arm", "alt", "--nanochat", tmp_path / "not-nanochat"), exp
    )
    assert "not a nanochat checkout (no scripts/base_train.py or nanochat)" in line

    bare = bare_python(tmp_path / "bare")
    exp = write_experiment(tmp_path, wd, ck, bare)
    line = unchanged(lambda e: refused("train", e, "--arm", "alt"), exp)
    assert f"nanochat python {bare} ([nanochat] python) cannot import torch" in line

    # a spec field 48804bf's base_train has no flag for
    exp = write_experiment(tmp_path, wd, ck, python, train_extra="warmup_steps = 10")
    line = unchanged(lambda e: refused("train", e, "--arm", "alt"), exp)
    assert "nanochat content:" in line and "has no flag for train.warmup_steps (--warmup-steps)" in line

    # an arm nanochat's loader cannot feed on 2 ranks (one row group a file): refused before it starts
    one_group = tmp_path / "one-group"
    docs = [t for f in sorted((wd / "arms" / "alt" / "data").glob("shard_*.parquet")) for t in _texts(f)]
    write_shards(one_group, docs, files=3, row_group_rows=len(docs), selection={}, pool_fingerprint="test")
    shutil.rmtree(wd / "arms" / "alt" / "data")
    shutil.copytree(one_group, wd / "arms" / "alt" / "data")
    exp = write_experiment(tmp_path, wd, ck, python)
    line = unchanged(
        lambda e: refused(
            "train", e, "--arm", "alt", "--device", "cpu", "--nproc", "2", "--device-batch-size", "2"
        ),
        exp,
    )
    assert "nanochat's loader strides the row groups of each file by rank" in line

    # a layout that feeds 2 ranks, but nanochat runs DDP on CUDA only
    shutil.rmtree(wd / "arms" / "alt" / "data")
    shutil.copytree(tpl / "arms" / "alt" / "data", wd / "arms" / "alt" / "data")
    line = unchanged(
        lambda e: refused(
            "train", e, "--arm", "alt", "--device", "cpu", "--nproc", "2", "--device-batch-size", "2"
        ),
        exp,
    )
    assert "nanochat trains several ranks only on CUDA" in line


def _texts(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["text"]).column("text").to_pylist()


def test_a_patched_checkout_whose_output_does_not_parse_still_trains(tmp_path, template, python):
    """A user's patched nanochat (a dirty git clone) that prints a line armlab cannot parse: the
    run goes on, the line is kept in train.log and counted, and the patch is in the fingerprint."""
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat", git=True)
    script = ck / "scripts" / "base_train.py"
    src = script.read_text()
    anchor = "    # state update\n"
    assert anchor in src
    script.write_text(
        src.replace(
            anchor, '    print0(f"step {step:05d}/{num_iterations:05d} | loss: (my patch)")\n' + anchor, 1
        )
    )
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, steps=4, eval_every=2,
                           save_every=2)  # fmt: skip
    ok("train", exp, "--arm", "alt")
    run = run_dir(exp, "alt")
    assert steps(run, "train_loss") == [1, 2, 3, 4] and steps(run, "val_bpb") == [0, 2, 4]
    state = read_state(run)
    assert state["state"] == "done" and state["unparsed_lines"] == 4
    log = (run / "train.log").read_text()
    assert (
        sum(ln.endswith("| loss: (my patch)") for ln in log.splitlines()) == 4
        and "4 line(s) of nanochat output looked like metrics" in log
    )
    engine = json.loads((run / "run.json").read_text())["engine"]
    assert (
        engine["dirty"] is True and engine["diff_sha256"] and engine["changed"] == ["scripts/base_train.py"]
    )


def test_doctor_checks_the_checkout(tmp_path, template, python):
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat", git=True)
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python)
    rep = json.loads(
        ok("doctor", exp, "--local", "--json", "--device", "cpu").stdout.strip().splitlines()[-1]
    )
    checks = {c["name"]: c for c in rep["checks"]}
    for name in ("nanochat checkout", "nanochat python", "nanochat gpus", "nanochat base_train", "tf32"):
        assert checks[name]["status"] == "ok", checks[name]
    assert (
        "torch 2." in checks["nanochat python"]["detail"]
        and "[nanochat] python" in checks["nanochat python"]["detail"]
    )

    # the playbook's TF32 crash: legacy and new APIs mixed in the checkout (what patch_nanochat.py fixed)
    common = ck / "nanochat" / "common.py"
    common.write_text(common.read_text() + "\ntorch.backends.cuda.matmul.allow_tf32 = True\n")
    gpt = ck / "nanochat" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\ntorch.backends.cuda.matmul.fp32_precision = 'tf32'\n")
    os.symlink(python.parents[1], ck / ".venv")  # `doctor --nanochat DIR` uses the checkout's own venv
    p = armlab("doctor", "--json", "--nanochat", str(ck))
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    checks = {c["name"]: c for c in rep["checks"]}
    assert p.returncode == 2 and checks["tf32"]["status"] == "fail"
    assert (
        "nanochat/common.py:" in checks["tf32"]["detail"] and "nanochat/gpt.py:" in checks["tf32"]["detail"]
    )
    assert (
        checks["nanochat checkout"]["status"] == "warn"
        and "uncommitted changes" in checks["nanochat checkout"]["detail"]
    )
    assert (
        checks["nanochat python"]["status"] == "ok" and "checkout venv" in checks["nanochat python"]["detail"]
    )


def test_a_fork_whose_lines_never_parse_fails_instead_of_ending_done(tmp_path, template, python):
    """Issue 20: a nanochat fork that logs in its own words ended `done` with no metrics.jsonl.
    A run that exits 0 without a single parsed step has not trained as far as anyone can tell."""
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat", git=True)
    script = ck / "scripts" / "base_train.py"
    src = script.read_text()
    for ours, theirs in (('print0(f"step {step:05d}/', 'print0(f"iter {step:05d}/'),
                         ('print0(f"Step {step:05d} | Validation bpb:', 'print0(f"at {step:05d} | val bpb:')):
        assert ours in src
        src = src.replace(ours, theirs)
    script.write_text(src)
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, steps=2, eval_every=2,
                           save_every=2)  # fmt: skip
    p = armlab("train", str(exp), "--arm", "alt")
    run = run_dir(exp, "alt")
    assert p.returncode == 1, p.stderr[-2000:]
    assert (
        f"armlab: failed: run 'alt-s0': the nanochat engine exited 0 but no step lines parsed from its output; "
        f"see {run / 'train.log'}" in " ".join(p.stderr.split())
    )
    state = read_state(run)
    assert state["state"] == "failed" and "no step lines parsed" in state["error"]
    assert read_metrics(run).records == [] and "iter 00001/00002" in (run / "train.log").read_text()


def test_a_non_finite_loss_line_ends_the_run_diverged(tmp_path, template, python):
    """A nanochat run whose loss turns NaN: the supervisor stops nanochat at the first NaN line
    (it would train on), the run is `diverged`, exit 1 naming the step and the last finite loss,
    and no NaN record reaches metrics.jsonl. nanochat's own learning rates (extra_args, which
    armlab's schema does not bound) at 1e30 make it diverge for real."""
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat")
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, steps=40, eval_every=40,
                           save_every=40)  # fmt: skip
    text = exp.read_text().replace(
        'extra_args = ["--sample-every=-1"]',
        'extra_args = ["--sample-every=-1", "--warmup-steps=0", "--embedding-lr=1e30", "--matrix-lr=1e30", '
        '"--scalar-lr=1e30", "--unembedding-lr=1e30"]',
    )
    exp.write_text(text)
    p = armlab("train", str(exp), "--arm", "alt")
    run = run_dir(exp, "alt")
    assert p.returncode == 1, p.stderr[-2000:]
    state = read_state(run)
    assert state["state"] == "diverged", state
    step = state["error"].split()[3].rstrip(":")
    assert f"run 'alt-s0' diverged at step {step}: nanochat's loss nan" in " ".join(p.stderr.split())
    assert all(m.get("train_loss") is None or m["train_loss"] == m["train_loss"] for m in read_metrics(run).records)
    assert max(steps(run, "train_loss"), default=0) < int(step) < 40  # stopped there, not trained through


def test_a_stop_before_nanochats_first_checkpoint_says_a_restart_begins_at_step_0(tmp_path, template, python):
    """nanochat cannot checkpoint on a signal: a stop before its first checkpoint says the restart
    begins from step 0, and the restart says so again and keeps the first try's logs."""
    tpl, _ = template
    ck = copy_checkout("92d63d4", tmp_path / "nanochat")
    exp = write_experiment(tmp_path, copy_workdir(tpl, tmp_path / "wd"), ck, python, steps=200, eval_every=200,
                           save_every=200)  # fmt: skip
    run = run_dir(exp, "alt")
    proc = spawn("train", str(exp), "--arm", "alt")
    try:
        wait_for(lambda: len(steps(run, "train_loss")) >= 2, 180, "two steps")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    err = " ".join(proc.stderr.read().split())
    state = read_state(run)
    assert state["state"] == "stopped" and state["resume_step"] is None and state["stop_reason"] == "SIGTERM"
    assert f"run 'alt-s0' stopped at step {state['step']} by SIGTERM before its first checkpoint: a restart " \
           "begins from step 0" in err, err  # fmt: skip
    first = (run / "train.log").read_text()
    p = ok("train", exp, "--arm", "alt", "--resume")
    said = f"alt-s0 has no checkpoint (it reached step {state['step']} before stopping): restarting from step 0"
    assert said in " ".join(p.stderr.split()) and (run / "train.1.log").read_text() == first
    assert steps(run, "train_loss") == list(range(1, 201))
