"""Data: pools, selection, shards, preparation, blob storage."""

import os

# pyarrow's allocator (mimalloc) returns freed pages to the OS 10 ms after a free by default, so
# each row group and hash range (~100 MB) can be faulted in afresh, and fresh pages are slow on
# VMs (first-touch memcpy measured at ~0.5 GB/s against 8 GB/s for reused memory). Keeping freed
# pages for reuse bounds each process at its peak of one row group or hash range. mimalloc reads
# this when pyarrow loads, hence here, before any armlab module imports pyarrow (the forked
# prepare workers inherit it); a value the user set wins.
os.environ.setdefault("MIMALLOC_PURGE_DELAY", "-1")
