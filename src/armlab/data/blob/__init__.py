"""Azure Blob Storage: download prebuilt shards; publish and pull an arm, and the experiment's
shared eval set + tokenizer.

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

The modules, one job each:

- `address`: `az://` uris (`AzPath`, `parse_az_uri`), blob names, where published dirs go;
- `auth`: credentials from the environment, secret scrubbing, the SDK client;
- `sdk`: SDK errors as one secret-free line, retries with backoff, listing a prefix;
- `download`: the verified, resumable downloader (`download_prefix`, `fetch_prebuilt`);
- `checks`: is a published arm, eval set or tokenizer this experiment's;
- `publish`: upload an arm or the shared assets (`publish`, `publish_shared`);
- `pull`: download them into a workdir (`pull`, `pull_shared`).
"""

from armlab.data.blob.address import MANIFEST_NAME, AzPath, arm_uri, parse_az_uri, shared_uris
from armlab.data.blob.auth import RetrySettings
from armlab.data.blob.download import (
    RECORD_NAME,
    FetchReport,
    download_prefix,
    fetch_prebuilt,
    read_download_record,
)
from armlab.data.blob.publish import PublishReport, publish, publish_shared
from armlab.data.blob.pull import pull, pull_shared
from armlab.data.blob.sdk import RemoteBlob

__all__ = [
    "MANIFEST_NAME",
    "RECORD_NAME",
    "AzPath",
    "FetchReport",
    "PublishReport",
    "RemoteBlob",
    "RetrySettings",
    "arm_uri",
    "download_prefix",
    "fetch_prebuilt",
    "parse_az_uri",
    "publish",
    "publish_shared",
    "pull",
    "pull_shared",
    "read_download_record",
    "shared_uris",
]
