"""The demo end to end through the CLI (a shorter horizon than the default), its rerun, and the
results commands' bad-input paths on the finished workdir."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from armlab.demo.pool import junk_documents, quality_score
from armlab.evaluate.bundle import load_bundle
from armlab.ops.status import collect_status
from armlab.runs import read_metrics


def armlab(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["armlab", *args], capture_output=True, text=True, timeout=timeout)


def test_quality_score_ranks_prose_above_junk() -> None:
    import random

    prose = (
        "Return the number of items in a container. The argument may be a sequence (such as a string, "
        "bytes, tuple, list, or range) or a collection (such as a dictionary, set, or frozen set)."
    )
    good = quality_score(prose)
    assert good > 0.9
    junk = junk_documents(
        12, ["alpha", "beta", "gamma", "delta", "sequence", "tuple"], [400, 700], random.Random(0)
    )
    assert {kind for kind, _ in junk} == {"word_salad", "boilerplate", "keyword_spam"}
    for kind, text in junk:
        assert quality_score(text) < (0.05 if kind != "boilerplate" else 0.75) < good, kind


@pytest.mark.e2e
def test_demo_end_to_end(tmp_path: Path) -> None:
    wd = tmp_path / "demo"
    r = armlab("demo", "--workdir", str(wd), "--num-iterations", "30")
    assert r.returncode == 0, r.stderr[-3000:]
    report = wd / "report"
    assert f"report: {report / 'report.html'}" in r.stdout
    s = json.loads((report / "summary.json").read_text())
    assert set(s["arms"]) == {"top40", "random40"}
    for arm in s["arms"].values():
        assert [run["seed"] for run in arm["runs"]] == [0, 1]
        assert all(0.5 < run["val_bpb"] < 10 for run in arm["runs"])
        assert all(run["tokens"] == 30 * 1024 for run in arm["runs"])
        assert arm["core"] is not None and arm["val_bpb"]["half_width"] is not None
        assert set(arm["core_tasks"]) == {
            "demo_next_word",
            "demo_real_vs_shuffled",
            "demo_real_vs_junk",
            "demo_coherent_context",
        }
    assert {c["metric"] for c in s["comparisons"]} == {"val_bpb", "core"}
    assert all(c["interval"]["paired"] and c["interval"]["low"] is not None for c in s["comparisons"])
    core = next(c for c in s["comparisons"] if c["metric"] == "core")
    assert core["interval"]["method"] == "seeds+items"  # per-item CORE results: eval-item noise is counted
    # the detectable difference as a range (from the seed noise's own interval), not one number
    assert all(c["detectable"]["low"] <= c["detectable"]["value"] <= c["detectable"]["high"] for c in s["comparisons"])
    # val bpb per source of the eval documents: stdlib prose and the three kinds of junk, each with
    # its interval, and a verdict line naming where top40 wins and loses
    g = s["groups"]
    assert g["column"] == "source" and {r["label"] for r in g["groups"]} == {
        "stdlib", "word_salad", "boilerplate", "keyword_spam"}  # fmt: skip
    assert sum(r["docs"] for r in g["groups"]) == 400 and all(r["differences"]["top40"]["low"] is not None
                                                              for r in g["groups"])  # fmt: skip
    (gline,) = g["verdict"]
    assert gline.startswith("top40 vs random40 by source (val bpb per group): ") and gline in r.stdout
    md = (report / "report.md").read_text()
    assert s["bundle"]["demo"] is True and "CORE (demo tasks)" in md
    # one verdict line, the same on stdout, in report.md, report.html and summary.json
    line = s["verdict"][0]
    assert line.startswith("top40 ") and "random40" in line and "95% CI" in line and "2 seeds, weak" in line
    assert line in r.stdout.splitlines() and f"- {line}" in md
    assert line in (report / "report.html").read_text().replace("&#x27;", "'")
    for png in ("differences.png", "groups.png", "curves.png", "final.png", "core_tasks.png", "data.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what differs in the data: each arm's docs as its manifest and shards hold them, and a sample
    # tokenized with the experiment's tokenizer
    for arm in ("top40", "random40"):
        shards = sorted((wd / f"arms/{arm}/data").glob("shard_*.parquet"))
        rows = sum(pq.ParquetFile(f).metadata.num_rows for f in shards)
        d = s["data"]["arms"][arm]
        assert d["docs"] == rows == json.loads((wd / f"arms/{arm}/data/manifest.json").read_text())["rows"]
        assert d["sample"]["docs"] == min(rows, 2000) and d["sample"]["tokens"] > d["sample"]["docs"]
        assert f"| {arm} | {rows:,} |" in md.split("## What differs in the data")[1]
    # each arm's mix of the pool's sources, counted by prepare: the top arm is (nearly) all stdlib prose
    mix = {arm: s["data"]["arms"][arm]["groups"] for arm in ("top40", "random40")}
    share = {arm: g["stdlib"] / sum(g.values()) for arm, g in mix.items()}
    assert share["top40"] > 0.98 and share["random40"] < 0.9, mix
    assert s["data"]["arms"]["top40"]["group_column"] == "source"
    # the top arm holds only good text; the random arm holds the pool's junk too
    top = [
        t
        for f in sorted((wd / "arms/top40/data").glob("shard_*.parquet"))
        for t in pq.read_table(f)["text"].to_pylist()
    ]
    rnd = [
        t
        for f in sorted((wd / "arms/random40/data").glob("shard_*.parquet"))
        for t in pq.read_table(f)["text"].to_pylist()
    ]
    junk = lambda docs: sum(quality_score(t) < 0.3 for t in docs) / len(docs)  # noqa: E731
    assert junk(top) < 0.02 < 0.08 < junk(rnd)
    # CORE items come from held-out eval docs only
    bundle = load_bundle(wd / "demo_bundle")
    eval_text = " ".join(
        " ".join(t.split())
        for f in sorted((wd / "eval").glob("shard_*.parquet"))
        for t in pq.read_table(f)["text"].to_pylist()
    )
    item = bundle.load_items(bundle.tasks[0])[0]
    assert item["context"] in eval_text

    # rerun: everything is reused, nothing retrained
    r2 = armlab("demo", "--workdir", str(wd), "--num-iterations", "30")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stderr.count("already done") == 4 and "step 00001" not in r2.stdout
    assert json.loads((report / "summary.json").read_text())["arms"] == s["arms"]

    # the demo again with another horizon: refused before any work, every file as it was (0.1
    # called the 30-step runs "already done", rewrote experiment.toml, then `compare` refused them)
    files = {p: p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()}
    other = armlab("demo", "--workdir", str(wd), "--num-iterations", "40")
    assert other.returncode == 2 and "4 runs here were trained under another spec" in other.stderr, other.stderr
    assert "differs in train.num_iterations" in other.stderr and len(other.stderr.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in sorted(wd.rglob("*")) if p.is_file()} == files

    # `armlab run` on the finished workdir: every step is complete, so it only rewrites the report
    again = armlab("run", str(wd))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 4 and "step 00001" not in again.stdout
    assert json.loads((report / "summary.json").read_text())["arms"] == s["arms"]
    assert line in again.stdout.splitlines()  # `armlab run` ends with the verdict too

    # a run that crashed (state failed, no checkpoint left) is trained again by `armlab run`, then
    # re-evaluated; the other runs are reused
    crashed = wd / "arms/top40/runs/top40-s1"
    state = json.loads((crashed / "state.json").read_text())
    (crashed / "state.json").write_text(json.dumps({**state, "state": "failed", "error": "simulated crash"}))
    shutil.rmtree(crashed / "checkpoints")
    old_eval = json.loads((crashed / "eval.json").read_text())
    again = armlab("run", str(wd))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") == 3 and "resuming top40-s1" in again.stderr
    assert json.loads((crashed / "state.json").read_text())["state"] == "done"
    new_eval = json.loads((crashed / "eval.json").read_text())
    assert new_eval["run_ended"] != old_eval["run_ended"] and new_eval["step"] == 30

    # status on the finished workdir
    st = armlab("status", str(wd))
    assert st.returncode == 0 and st.stdout.count("done") == 4

    # bad input: a missing bundle names the path; a run dir from another experiment is refused
    bad = armlab("evaluate", str(wd), "--bundle", str(tmp_path / "nope"))
    assert (
        bad.returncode == 2
        and "nope: eval bundle dir not found" in bad.stderr
        and "Traceback" not in bad.stderr
    )
    run = wd / "arms/top40/runs/top40-s1/run.json"
    info = json.loads(run.read_text())
    run.write_text(json.dumps({**info, "experiment": "another-experiment"}))
    bad = armlab("compare", str(wd))
    assert bad.returncode == 2 and "belongs to experiment 'another-experiment'" in bad.stderr
    run.write_text(json.dumps({**info, "comparability": {**info["comparability"], "model": {"depth": 9}}}))
    bad = armlab("compare", str(wd))
    assert bad.returncode == 2 and "differs in model.aspect_ratio, model.depth" in bad.stderr

    # a real training run paused with SIGSTOP shows STALLED, SIGCONT brings it back to running
    run.write_text(json.dumps(info))
    live = armlab(
        "train",
        str(wd),
        "--arm",
        "top40",
        "--seed",
        "7",
        "--detach",
        "--num-iterations",
        "100000",
        "--allow-repeat",
    )
    assert live.returncode == 0, live.stderr[-2000:]
    run_dir = wd / "arms/top40/runs/top40-s7"
    try:
        wait_for(lambda: any("train_loss" in m for m in read_metrics(run_dir).records), 120)
        launcher = psutil.Process(json.loads((run_dir / "state.json").read_text())["pid"])
        worker = next(
            p for p in launcher.children(recursive=True) if "armlab.train.worker" in " ".join(p.cmdline())
        )
        wait_for(lambda: collect_status([run_dir], 2.0)[0].state == "running", 30)
        worker.suspend()  # SIGSTOP
        wait_for(lambda: collect_status([run_dir], 2.0)[0].state == "STALLED", 30)
        assert collect_status([run_dir], 2.0)[0].alive is True  # the launcher lives; nothing advances
        worker.resume()  # SIGCONT
        wait_for(lambda: collect_status([run_dir], 2.0)[0].state == "running", 30)
        launcher.terminate()  # a clean stop: the launcher stops its ranks and records it
        wait_for(lambda: json.loads((run_dir / "state.json").read_text())["state"] == "stopped", 60)
        assert collect_status([run_dir], 2.0)[0].state == "stopped"
    finally:  # never leave a trainer behind: kill the launcher (from state.json) and its children
        pid = (
            json.loads((run_dir / "state.json").read_text()).get("pid")
            if (run_dir / "state.json").exists()
            else None
        )
        if pid and psutil.pid_exists(pid):
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            for p in procs:
                p.resume()
                p.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


def wait_for(cond, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout}s")
