"""The per-run nanochat base dir, checked with nanochat's own dataset code at both commits."""

from __future__ import annotations

import json
import os
import subprocess

import pyarrow.parquet as pq
import pytest
import torch

from armlab.errors import ArmlabError
from armlab.train.engines.nanochat_layout import (
    DATA_DIRS,
    VAL_FILE,
    BaseDir,
    build,
    check_feeds,
    checkpoint_steps,
    file_order,
    val_texts,
    write_val_file,
)
from armlab.train.units import check_feeds as armlab_check_feeds
from nanochat_util import copy_checkout, nanochat_python
from tok_util import corpus, write_shards

# nanochat's own view of a base dir: which file is val, and the val documents it reads
NANOCHAT_VIEW = """\
import json
from nanochat.dataset import list_parquet_files, parquets_iter_batched
files = list_parquet_files()
val = [t for batch in parquets_iter_batched("val") for t in batch]
print(json.dumps({"files": files, "val": val}))
"""


@pytest.fixture
def inputs(tmp_path):
    docs = corpus()
    eval_docs, arm_docs = docs[:37], docs[37:]
    write_shards(tmp_path / "eval", eval_docs, files=3, row_group_rows=8)  # several files: one val file
    write_shards(tmp_path / "data", arm_docs, files=4, row_group_rows=16)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.pkl").write_bytes(b"")
    return tmp_path, eval_docs


def test_base_dir_holds_the_arm_and_the_shared_eval_set(inputs):
    root, eval_docs = inputs
    base = BaseDir.of_run(root / "run")
    order = build(base, root / "data", root / "eval", root / "tok", world_size=3, row_group_rows=1024, data_seed=1)
    shards = sorted(p.name for p in (root / "data").glob("shard_*.parquet"))
    assert order == [shards[i] for i in file_order(len(shards), 1)] and sorted(order) == shards
    assert order != shards  # seed 1 starts on the second file: nanochat reads another order than sorted
    for name in DATA_DIRS:
        listed = sorted(p.name for p in base.data_dir(name).glob("*.parquet"))
        assert listed == [*shards, VAL_FILE]  # link names shard_00000..: the eval file sorts last, the val split
        for i, s in enumerate(order):  # the link at position i is the i-th file of the seed's order
            assert (base.data_dir(name) / f"shard_{i:05d}.parquet").resolve() == (root / "data" / s).resolve()
    assert os.readlink(base.data_dir("base_data_climbmix") / VAL_FILE) == f"../base_data/{VAL_FILE}"
    assert val_texts(base) == eval_docs
    assert pq.ParquetFile(base.val_file).metadata.num_row_groups >= 3  # every rank validates
    assert pq.ParquetFile(base.val_file).schema_arrow.names == ["text"]
    assert base.tokenizer.resolve() == (root / "tok").resolve()

    mtime = base.val_file.stat().st_mtime_ns  # a restart (resume) reuses the eval file
    build(base, root / "data", root / "eval", root / "tok", world_size=3, row_group_rows=1024)
    assert base.val_file.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("commit", ["48804bf", "92d63d4"])
def test_nanochat_validates_on_exactly_the_eval_docs(inputs, commit):
    root, eval_docs = inputs
    base = BaseDir.of_run(root / "run")
    build(base, root / "data", root / "eval", root / "tok", world_size=2, row_group_rows=1024)
    ck = copy_checkout(commit, root / "nc")
    out = subprocess.run(
        [str(nanochat_python()), "-c", NANOCHAT_VIEW], cwd=ck, capture_output=True, text=True, check=True,
        env={**os.environ, "NANOCHAT_BASE_DIR": str(base.root)},
    )  # fmt: skip
    view = json.loads(out.stdout.strip().splitlines()[-1])
    want_dir = "base_data" if commit == "48804bf" else "base_data_climbmix"
    assert [os.path.relpath(f, base.root) for f in view["files"]][-1] == f"{want_dir}/{VAL_FILE}"
    assert len(view["files"]) == 5
    assert view["val"] == eval_docs


def test_one_row_group_shards_cannot_feed_nanochats_ranks(tmp_path):
    """The playbook's hang: nanochat strides row groups within each file, so 5 one-group files
    feed one rank only, though armlab's own loader (units over all files) feeds five."""
    docs = corpus(100)
    write_shards(tmp_path / "data", docs, files=5, row_group_rows=100)
    armlab_check_feeds(tmp_path / "data", 5)
    check_feeds(tmp_path / "data", 1)
    with pytest.raises(ArmlabError) as e:
        check_feeds(tmp_path / "data", 2)
    assert "largest shard has 1 row group" in str(e.value) and "ranks 1..1 of 2" in str(e.value)


def test_val_file_row_groups_and_too_few_docs(tmp_path):
    write_shards(tmp_path / "eval", corpus(9), files=1, row_group_rows=1024)
    dest = tmp_path / "base" / VAL_FILE
    assert write_val_file(tmp_path / "eval", dest, world_size=4, row_group_rows=1024) == 9
    assert pq.ParquetFile(dest).metadata.num_row_groups >= 4  # 9 docs, 4 ranks: 2-row groups
    with pytest.raises(ArmlabError, match=r"holds 9 documents, fewer than the 16 ranks"):
        write_val_file(tmp_path / "eval", dest, world_size=16, row_group_rows=1024)


def test_only_complete_checkpoints_count(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    for step in (2, 4, 6, 8):
        torch.save({"w": torch.zeros(64)}, d / f"model_{step:06d}.pt")  # a zip archive, as nanochat's
        (d / f"meta_{step:06d}.json").write_text("{}")
        for r in range(2):
            torch.save({"o": torch.zeros(64)}, d / f"optim_{step:06d}_rank{r}.pt")
    (d / "optim_000006_rank1.pt").unlink()  # killed while rank 1 saved
    (d / "meta_000004.json").write_text('{"step": 4, "val')  # torn meta
    whole = (d / "optim_000008_rank0.pt").read_bytes()
    (d / "optim_000008_rank0.pt").write_bytes(whole[: len(whole) // 2])  # kill -9 mid-write: no central directory
    assert checkpoint_steps(d, world_size=2) == [2]
    assert checkpoint_steps(d, world_size=1) == [2, 6]
    assert checkpoint_steps(tmp_path / "none", 1) == []
