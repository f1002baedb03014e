"""Two armlab processes on one workdir, for real: racing prepares, a train that arrives while a
prepare --overwrite of its arm is between its checks and its swap (both orders, made
deterministic by the test-only ARMLAB_TEST_PAUSE hook), and several readers of one arm at once
(leases held by processes the test releases, and a real training run beside them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from armlab.workdir import read_leases
from data_util import experiment_toml, make_pool
from test_data_prepare import all_shas, assert_refused, cli

ARMS = """
[[arms]]
name = "rand"
kind = "random"
ratio = {ratio}
seed = 42

[[arms]]
name = "top"
kind = "top"
ratio = 0.2
score_column = "score"
"""
TRAIN = """
[train]
device_batch_size = 2
total_batch_size = 128
num_iterations = 6
eval_every = 6
eval_tokens = 512
save_every = 100
compile = false
allow_repeat = true
"""


class Proc:
    """A real `armlab` process whose output goes to files (no pipe to fill up)."""

    def __init__(self, tmp: Path, name: str, *args: str | Path, env: dict[str, str] | None = None):
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        cmd = [sys.executable, "-c", "from armlab.cli import main; main()", *map(str, args)]
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen(cmd, stdout=o, stderr=e, env={**os.environ, **(env or {})})

    def wait(self, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        rc = self.p.wait(timeout)
        return subprocess.CompletedProcess(self.p.args, rc, self.out.read_text(), self.err.read_text())

    def stderr(self) -> str:
        return self.err.read_text()

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def wait_for(pred, what: str, timeout: float = 90) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def write_exp(d: Path, pool: Path, ratio: float = 0.3, name: str = "exp.toml", workdir: Path | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(experiment_toml(workdir or d / "wd", str(pool), arms=ARMS.format(ratio=ratio), eval_docs=100) + TRAIN)
    return p


def strays(wd: Path) -> list[Path]:
    return [p for p in wd.rglob("*") if p.name.endswith(".tmp") or ".partial" in p.name or ".old" in p.name]


def test_two_prepares_racing_on_one_workdir_give_a_clean_runs_shards(tmp_path: Path) -> None:
    """The second prepare waits for the first (one line naming it), then finds everything up to
    date; at every start offset the result equals a clean run, with no temp files left. The last
    start is made while the first holds the lock at its first swap (ARMLAB_TEST_PAUSE), so the
    wait is always exercised."""
    pool = tmp_path / "pool"
    make_pool(pool, 4000, n_files=6, row_groups_per_file=3, seed=7)
    clean = write_exp(tmp_path / "clean", pool)
    assert cli("prepare", clean, "--workers", "2").returncode == 0
    want = all_shas(tmp_path / "clean" / "wd")
    for k, offset in enumerate((0.0, 0.4, "paused")):
        exp, pause = write_exp(tmp_path / f"race{k}", pool), tmp_path / f"pause{k}"
        pause.mkdir()
        env = {"ARMLAB_TEST_PAUSE": f"locked:{pause}"} if offset == "paused" else {}
        a = Proc(tmp_path, f"a{k}", "prepare", exp, "--workers", "2", env=env)
        if offset == "paused":
            wait_for(lambda: any(pause.glob("*.paused")), "the first prepare mid-swap")  # noqa: B023
        else:
            time.sleep(offset)
        b = Proc(tmp_path, f"b{k}", "prepare", exp, "--workers", "2")
        if offset == "paused":
            wait_for(lambda: "waiting for pid" in b.stderr(), "the second prepare to wait")  # noqa: B023
            assert f"pid {a.p.pid}" in b.stderr() and "prepare" in b.stderr()
            (pause / "go").touch()
        ra, rb = a.wait(), b.wait()
        for r in (ra, rb):
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
        if offset == "paused":
            assert "up to date" in rb.stderr
        wd = tmp_path / f"race{k}" / "wd"
        assert all_shas(wd) == want, offset
        assert not strays(wd), strays(wd)


@pytest.fixture(scope="module")
def trained_wd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A prepared workdir with its tokenizer; exp.toml has rand at ratio 0.3, alt.toml at 0.5."""
    tmp = tmp_path_factory.mktemp("leases")
    pool = tmp / "pool"
    make_pool(pool, 2000, n_files=3, seed=1)
    exp = write_exp(tmp, pool)
    alt = write_exp(tmp, pool, ratio=0.5, name="alt.toml", workdir=tmp / "wd")
    assert cli("prepare", exp, "--workers", "1").returncode == 0
    assert cli("tokenizer", exp).returncode == 0
    return {"tmp": tmp, "exp": exp, "alt": alt, "data": tmp / "wd" / "arms" / "rand" / "data"}


def data_ratio(data: Path) -> float:
    return json.loads((data / "manifest.json").read_text())["selection"]["ratio"]


def other_spec(w: dict[str, Path]) -> Path:
    """The experiment file whose rand arm differs from what the data dir holds now."""
    return w["alt"] if data_ratio(w["data"]) == 0.3 else w["exp"]


def shard_shas(data: Path) -> dict[str, str]:
    from armlab.data.shards import sha256_file

    return {p.name: sha256_file(p) for p in sorted(data.glob("*.parquet"))}


def has_lease(data: Path, run: str) -> bool:
    return any(x.run == run for x in read_leases(data))


@pytest.mark.e2e
def test_train_arriving_before_the_swap_refuses_the_swap(trained_wd: dict[str, Path], tmp_path: Path) -> None:
    """prepare --overwrite has checked the leases and written its shards; a train takes its lease;
    the swap re-checks under the arm's lock and refuses: the run's data never moves."""
    w, pause = trained_wd, tmp_path / "pause"
    pause.mkdir()
    before = shard_shas(w["data"])
    prep = Proc(tmp_path, "prep", "prepare", other_spec(w), "--arm", "rand", "--overwrite", "--workers", "1",
                env={"ARMLAB_TEST_PAUSE": f"swap:{pause}"})  # fmt: skip
    train = None
    try:
        wait_for(lambda: (pause / "rand.paused").exists(), "prepare at its swap")
        train = Proc(tmp_path, "train", "train", w["exp"], "--arm", "rand", "--device", "cpu", "--run-name", "early",
                     env={"ARMLAB_TEST_STEP_DELAY": "0.3"})  # fmt: skip
        wait_for(lambda: has_lease(w["data"], "early"), "the train's lease")
        (pause / "go").touch()
        r = prep.wait()
        assert_refused(r, "refusing to replace arm 'rand'", "leased by live run 'early'")
        assert shard_shas(w["data"]) == before
        t = train.wait()
        assert t.returncode == 0, t.stderr[-2000:]
    finally:
        prep.kill()
        if train is not None:
            train.kill()
    assert shard_shas(w["data"]) == before and not has_lease(w["data"], "early")
    assert not list(w["data"].glob(".*.tmp"))


@pytest.mark.e2e
def test_train_arriving_during_the_swap_waits_then_refuses_the_new_data(
    trained_wd: dict[str, Path], tmp_path: Path
) -> None:
    """prepare holds the arm's lock mid-swap; the train (planned on the old data) waits for the
    lock, then refuses: the data it was planned on is gone. A new train uses the new data."""
    w, pause = trained_wd, tmp_path / "pause"
    pause.mkdir()
    new_spec = other_spec(w)
    prep = Proc(tmp_path, "prep", "prepare", new_spec, "--arm", "rand", "--overwrite", "--workers", "1",
                env={"ARMLAB_TEST_PAUSE": f"locked:{pause}"})  # fmt: skip
    train = None
    try:
        wait_for(lambda: (pause / "rand.paused").exists(), "prepare holding the arm's lock")
        train = Proc(tmp_path, "train", "train", w["exp"], "--arm", "rand", "--device", "cpu", "--run-name", "late")
        wait_for(lambda: "waiting for pid" in train.stderr(), "the train to wait for the lock")
        assert not has_lease(w["data"], "late")
        (pause / "go").touch()
        assert prep.wait().returncode == 0
        t = train.wait()
        assert_refused(t, "changed since run 'late' was planned")
    finally:
        prep.kill()
        if train is not None:
            train.kill()
    assert data_ratio(w["data"]) == (0.5 if new_spec == w["alt"] else 0.3)
    r = cli("train", w["exp"], "--arm", "rand", "--device", "cpu", "--run-name", "after", timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]


class LeaseHolder:
    """A process the test controls that holds a read lease on an arm, as a training run does
    (`workdir.leased`), until the test lets it go: nothing depends on how long a run takes."""

    CODE = (
        "import sys\nfrom armlab.workdir import leased\n"
        "with leased(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )

    def __init__(self, data: Path, run: str):
        self.p = subprocess.Popen([sys.executable, "-c", self.CODE, str(data), run], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.p.stdout.readline().strip() == "held"  # blocks until the lease is written

    def release(self) -> None:
        self.p.stdin.close()  # the holder's read returns: it leaves the block, releasing the lease
        assert self.p.wait(timeout=60) == 0


@pytest.mark.e2e
def test_two_runs_of_one_arm_share_it_and_prepare_waits_for_both(
    trained_wd: dict[str, Path], tmp_path: Path
) -> None:
    """Two live leases on one arm: prepare --overwrite is refused naming one and counting the
    other; a real training run of the arm shares it with both (it trains to the end); prepare is
    still refused while one lease is left, and succeeds once none is. The leases are held by
    processes the test releases, so no check races a run's end (it did on a loaded machine)."""
    w = trained_wd
    holders = [LeaseHolder(w["data"], f"shared{k}") for k in range(2)]
    try:
        refused = cli("prepare", other_spec(w), "--arm", "rand", "--overwrite", "--workers", "1")
        assert_refused(refused, "leased by live run 'shared", "and 1 more run")
        t = cli("train", w["exp"], "--arm", "rand", "--device", "cpu", "--run-name", "beside", timeout=240)
        assert t.returncode == 0, t.stderr[-2000:]  # a third reader: shared, not refused
        assert {x.run for x in read_leases(w["data"])} == {"shared0", "shared1"}  # its own lease released
        holders[0].release()
        assert_refused(cli("prepare", other_spec(w), "--arm", "rand", "--overwrite", "--workers", "1"),
                       "leased by live run 'shared1'")  # fmt: skip
        holders[1].release()
    finally:
        for h in holders:
            if h.p.poll() is None:
                h.p.kill()
                h.p.wait()
    assert read_leases(w["data"]) == []
    assert cli("prepare", other_spec(w), "--arm", "rand", "--overwrite", "--workers", "1").returncode == 0
