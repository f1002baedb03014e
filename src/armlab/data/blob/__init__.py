"""Published dirs in a store (Azure Blob Storage, usually): download prebuilt shards; publish and
pull an arm, and the experiment's shared eval set + tokenizer.

A published dir (an arm's data dir, the eval set, the tokenizer) is its files plus manifest.json:
publishing uploads the files with Content-MD5, then the manifest last; pulling reads the manifest
first, downloads and verifies the files, then writes the manifest locally last. Either way a
manifest is only ever visible beside a complete set of files. Two kinds of dirs travel this way:

- an arm (`publish`, `pull`): `<workdir>/arms/<arm>/data/` <-> `az://c/<arm prefix>/`, shards
  checked against the manifest's sha256; pull refuses an arm of another spec or eval set;
- the experiment's shared assets (`publish_shared`, `pull_shared`), which a GPU node needs besides
  its arm to train and to stay comparable: the eval set and the tokenizer (not its training
  sample), under an experiment prefix:

      az://c/<exp prefix>/_shared/eval/       shard_*.parquet + manifest.json  (<workdir>/eval/)
      az://c/<exp prefix>/_shared/tokenizer/  tokenizer.pkl, token_bytes.npy, manifest.json
      az://c/<exp prefix>/<arm>/              an arm published beside them (`arm_uri`)

Where the bytes travel is the storage seam (`armlab.store`: Azure, or any other store, with one
retry/timeout/redaction layer and verified, resumable downloads); the modules here, one job each:

- `address`: where published dirs go (`shared_uris`, `arm_uri`);
- `checks`: is a published arm, eval set or tokenizer this experiment's; is a file a shard;
- `publish`: upload an arm or the shared assets (`publish`, `publish_shared`);
- `pull`: download them into a workdir (`pull`, `pull_shared`); `fetch_prebuilt` for prepare.
"""

from pathlib import Path
from typing import Any

from armlab.data.blob.address import MANIFEST_NAME, arm_uri, folder, shared_uris
from armlab.data.blob.checks import shard_problem
from armlab.data.blob.publish import PublishReport, publish, publish_shared
from armlab.data.blob.pull import pull, pull_shared
from armlab.store.download import RECORD_NAME, FetchReport, read_download_record
from armlab.store.download import download_prefix as _download_prefix


def download_prefix(uri: str, dest: str | Path, **kw: Any) -> FetchReport:
    """The shards under a store folder into `dest` (`armlab.store.download.download_prefix`, each
    .parquet file checked to be a shard: a string `text` column)."""
    return _download_prefix(folder(uri), dest, check=shard_problem, **kw)


def fetch_prebuilt(
    uri: str, dest: Path, *, mode: str = "bulk", concurrency: int = 8, skip_download: bool = False
) -> Path:
    """Download a store folder's parquet files into `dest` (verified, resumable); returns `dest`.

    Contract for `armlab.data.prepare`, which then normalises the files (eval removal, shuffle,
    re-sharding). Raises ArmlabError (one line) for every bad input or failure.
    """
    return download_prefix(uri, dest, mode=mode, concurrency=concurrency, skip_download=skip_download).dest


__all__ = [
    "MANIFEST_NAME",
    "RECORD_NAME",
    "FetchReport",
    "PublishReport",
    "download_prefix",
    "read_download_record",
    "arm_uri",
    "fetch_prebuilt",
    "publish",
    "publish_shared",
    "pull",
    "pull_shared",
    "shared_uris",
]
