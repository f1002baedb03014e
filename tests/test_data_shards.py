"""ShardWriter: the shard bytes are a function of the rows alone, however the rows were cut into
tables (stage 2's hash ranges and shard boundaries cut them differently as sizes change)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from armlab.data.shards import ShardWriter


def _rows(n: int) -> pa.Table:
    rng = np.random.default_rng(0)  # ~1.5 KB docs: 1,024 of them (Arrow's write batch) fill a 1 MB page
    text = ["é" * int(k) + f" doc {i}" for i, k in enumerate(rng.integers(1, 1500, size=n))]
    return pa.table({"text": text, "chars": pa.array([len(t) for t in text], pa.int32())})


def _write(out: Path, pieces: list[pa.Table]) -> list[dict]:
    w = ShardWriter(out, rows_per_shard=1500, row_group_rows=1200, chars_column="chars")
    for p in pieces:
        w.write(p)
    return w.close()


def test_shard_bytes_do_not_depend_on_how_rows_arrive(tmp_path: Path) -> None:
    rows = _rows(3100)
    whole = _write(tmp_path / "whole", [rows])
    # cuts inside and across row groups and shards; a piece boundary inside a row group used to
    # start a new data page there (same rows, other bytes)
    cuts = [0, 1, 300, 1199, 1200, 1201, 1499, 1500, 1501, 2000, 3099, 3100]
    pieces = _write(tmp_path / "pieces", [rows.slice(a, b - a) for a, b in zip(cuts, cuts[1:], strict=False)])
    assert [f["sha256"] for f in whole] == [f["sha256"] for f in pieces]
    assert [f["rows"] for f in whole] == [1500, 1500, 100]
    assert [f["row_groups"] for f in whole] == [2, 2, 1]
    # chars: summed from the column (counted once upstream), which is not written to the shard
    assert sum(f["chars"] for f in whole) == sum(len(t) for t in rows["text"].to_pylist())
    shard = pq.read_table(tmp_path / "whole" / whole[0]["name"])
    assert shard.column_names == ["text"]
    assert shard["text"].to_pylist() == rows["text"].to_pylist()[:1500]
    assert pq.ParquetFile(tmp_path / "pieces" / pieces[0]["name"]).metadata.num_row_groups == 2
