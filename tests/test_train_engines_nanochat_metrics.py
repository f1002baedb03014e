"""nanochat's stdout -> metrics records, on output captured from real base_train runs.

tests/data/nanochat/base_train_<commit>.log is the whole output of
`python -m scripts.base_train --depth=2 --max-seq-len=128 --device-batch-size=4
--total-batch-size=1024 --num-iterations=4 --eval-every=2 --core-metric-every=2 --save-every=2
--window-pattern=L --device-type=cpu` at each commit (TORCHDYNAMO_DISABLE=1, a tiny armlab arm,
a 4-task CORE bundle), with the base dir's path replaced by $NANOCHAT_BASE_DIR.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from armlab.train.engines.nanochat_metrics import EvalLine, MetricsParser, TrainLine, Unparsable, parse_line

DATA = Path(__file__).parent / "data" / "nanochat"


def records(commit: str) -> tuple[list[dict], MetricsParser]:
    p = MetricsParser(tokens_per_step=1024, train_files=5, mfu=False)
    lines = (DATA / f"base_train_{commit}.log").read_text().splitlines()
    return [r for line in lines if (r := p.feed(line)) is not None], p


@pytest.mark.parametrize("commit", ["48804bf", "92d63d4"])
def test_real_output_becomes_armlab_records(commit):
    recs, parser = records(commit)
    assert parser.unparsed == 0  # banners, config dumps, checkpoint and CORE task lines are plain log
    train = [r for r in recs if "train_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # printed 0..3: completed steps are 1..4
    assert [r["tokens"] for r in train] == [1024, 2048, 3072, 4096]
    assert all(r["train_loss"] > 5 and r["tok_per_s"] > 0 and r["mfu"] is None for r in train)
    assert train[0]["time"] == pytest.approx(train[0]["dt"], abs=1e-3)
    assert train[-1]["time"] == pytest.approx(sum(r["dt"] for r in train), abs=1e-3)
    assert all(r["epoch"] >= 0 for r in train)
    val = [r for r in recs if "val_bpb" in r]
    assert [r["step"] for r in val] == [0, 2, 4] and all(3 < r["val_bpb"] < 6 for r in val)
    core = [r for r in recs if "core" in r]
    assert [r["step"] for r in core] == [2, 4] and all(-1 <= r["core"] <= 1 for r in core)
    assert set(train[0]) == {
        "step",
        "tokens",
        "time",
        "train_loss",
        "lr_mult",
        "dt",
        "tok_per_s",
        "mfu",
        "epoch",
    }


def test_92d63d4_prints_the_file_index_48804bf_only_the_epoch():
    line_new = "step 00000/00004 (0.00%) | loss: 5.990400 | lrm: 0.03 | dt: 120.39ms | tok/sec: 8,505 | bf16_mfu: 0.00 | epoch: 4 pq: 2 rg: 0 | total time: 0.00m"
    line_old = "step 00000/00004 (0.00%) | loss: 5.990400 | lrm: 1.00 | dt: 140.37ms | tok/sec: 7,295 | bf16_mfu: 0.00 | epoch: 4 | total time: 0.00m"
    new, old = parse_line(line_new), parse_line(line_old)
    assert isinstance(new, TrainLine) and (new.epoch, new.pq, new.tok_per_s, new.dt_s) == (
        4,
        2,
        8505,
        0.12039,
    )
    assert isinstance(old, TrainLine) and (old.epoch, old.pq) == (4, None)
    p = MetricsParser(tokens_per_step=512, train_files=5)
    assert p.feed(line_new)["epoch"] == pytest.approx(3.4)
    assert p.feed(line_old)["epoch"] == 3.0


def test_gpu_line_keeps_mfu_and_eta():
    line = "step 00249/01000 (24.90%) | loss: 3.123456 | lrm: 1.00 | dt: 412.01ms | tok/sec: 1,272,553 | bf16_mfu: 47.31 | epoch: 1 pq: 12 rg: 3 | total time: 1.68m | eta: 5.2m"
    rec = MetricsParser(tokens_per_step=524288, train_files=100).feed(line)
    assert rec["step"] == 250 and rec["tokens"] == 250 * 524288 and rec["mfu"] == 47.31
    assert rec["tok_per_s"] == 1272553 and rec["epoch"] == pytest.approx(0.12)


def test_eval_lines():
    assert parse_line("Step 00250 | Validation bpb: 0.912345") == EvalLine(250, "val_bpb", 0.912345)
    assert parse_line("Step 02000 | CORE metric: -0.0167") == EvalLine(2000, "core", -0.0167)
    assert math.isnan(parse_line("Step 00250 | Validation bpb: nan").value)  # a diverged run still logs


@pytest.mark.parametrize(
    "line",
    [
        "step 00042/01000 (4.20%) | loss: | lrm: 1.00",  # truncated mid-print
        "step 00042/01000 (4.20%) | loss: 5.1 | lrm: 1.00 | dt: fast | tok/sec: 1",
        "Step 00250 | Validation bpb: n/a",
        "Step 00250 | Something new: 1.0",
        "step 7 of a recipe",
    ],
)
def test_lookalikes_are_counted_not_fatal(line):
    with pytest.raises(Unparsable):
        parse_line(line)
    p = MetricsParser(tokens_per_step=1, train_files=1)
    assert p.feed(line) is None and p.unparsed == 1 and p.examples == [line]


@pytest.mark.parametrize(
    "line", ["", "Vocab size: 400", "Steps are counted from 0", "  step back", "Total batch size 1,024"]
)
def test_ordinary_lines_are_not_metrics(line):
    p = MetricsParser(tokens_per_step=1, train_files=1)
    assert parse_line(line) is None and p.feed(line) is None and p.unparsed == 0
