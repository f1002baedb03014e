"""Download throughput from a local Azurite: bulk vs sequential (armlab.data.blob.download_prefix).

Seeds ~200 MB of real parquet shards in 20 blobs (block uploads, so no Content-MD5, as in the
playbook's container), then times each mode into a fresh dir, and a floor: the plain SDK reading
the same blobs one by one into memory (no disk, no hashing, no verification).

    python bench/blob.py [--blobs 20] [--mb 10] [--concurrency 8]

Needs Azurite (scripts/test.sh installs it). Loopback numbers measure armlab's and the SDK's
overhead, not a network: Azurite (one node process) shares the machine's cores with the client.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from azurite_util import running_azurite  # noqa: E402


def shard(mb: int, seed: int) -> bytes:
    rows = mb * 10_000  # ~100 bytes of text per row, uncompressed
    raw = np.random.default_rng(seed).integers(0, 2**63, size=(rows, 7), dtype=np.int64)
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [r.tobytes().hex()[:100] for r in raw]}), buf, compression="none")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blobs", type=int, default=20)
    ap.add_argument("--mb", type=int, default=10, help="MB per blob")
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()

    from azure.storage.blob import BlobServiceClient

    from armlab.data.blob import download_prefix

    with (
        tempfile.TemporaryDirectory(prefix="armlab-bench-blob-") as tmp,
        running_azurite(Path(tmp) / "azurite") as az,
    ):
        os.environ.update(az.env())
        client = BlobServiceClient.from_connection_string(az.connection_string, max_single_put_size=4 << 20)
        cc = client.create_container("bench")
        total = 0
        for i in range(args.blobs):
            data = shard(args.mb, i)
            cc.upload_blob(f"top/shard_{i:05d}.parquet", data, max_concurrency=4)
            total += len(data)
        print(f"seeded {args.blobs} blobs, {total / 1e6:,.1f} MB; cpu cores: {os.cpu_count()}")

        t0 = time.perf_counter()
        for b in cc.list_blobs(name_starts_with="top/"):
            cc.get_blob_client(b.name).download_blob().readall()
        floor = time.perf_counter() - t0
        print(f"{'SDK readall, one by one (floor)':40s} {total / floor / 1e6:8.1f} MB/s  {floor:6.2f}s")

        runs = [("sequential", 1), ("bulk", args.concurrency), ("bulk", 2 * args.concurrency)]
        for mode, conc in runs:
            dest = Path(tmp) / f"{mode}-{conc}"
            t0 = time.perf_counter()
            report = download_prefix("az://bench/top", dest, mode=mode, concurrency=conc)
            dt = time.perf_counter() - t0
            assert report.fetched == args.blobs and report.bytes_fetched == total
            label = f"armlab {mode}" + (f" (concurrency {conc})" if mode == "bulk" else "")
            print(
                f"{label:40s} {total / dt / 1e6:8.1f} MB/s  {dt:6.2f}s  (verified: size+etag, md5+sha256 hashed)"
            )
            shutil.rmtree(dest)


if __name__ == "__main__":
    main()
