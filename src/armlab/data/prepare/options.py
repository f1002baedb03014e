"""How a prepare runs (`armlab prepare`'s flags), as one value the passes share."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrepareOptions:
    workers: int | None = None  # units at once (None: [prepare] workers, else the CPU count / the cluster's CPUs)
    executor: str | None = None  # "local" | "ray" (None: [prepare] executor)
    ray_address: str | None = None  # the Ray head's host:port (None: [prepare] ray_address)
    force: bool = False  # take over a data dir whose lease holder is dead
    overwrite: bool = False  # replace dirs prepared from a different spec
    skip_bad_files: bool = False  # skip unreadable pool files (recorded in the manifests)
    keep_cache: bool = False  # keep downloaded pool files in <workdir>/cache
    skip_download: bool = False  # prebuilt az:// arms: use what is already downloaded
