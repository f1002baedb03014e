"""hf:// stores: the Hugging Face hub through huggingface_hub's HfFileSystem (HF_TOKEN and
HF_ENDPOINT come from the environment, read by huggingface_hub itself and never logged).

A repo listing is pinned: the revision asked for (a branch, `main` by default) is resolved to its
commit once, the files are listed at that commit, and every later read names the commit. A
commit never changes, so every byte read is of the version listed, however the branch moves
meanwhile; names shown and recorded keep the revision as the user wrote it. (Buckets have no
commits: their reads are checked like any fsspec store's.)
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from armlab.store.base import Entry
from armlab.store.fsspec import FsspecStore
from armlab.store.net import Retry

PINNED = re.compile(r"@[0-9a-f]{40}(/|$)")


class HfStore(FsspecStore):
    def __init__(self, retry: Retry | None = None):
        super().__init__("hf", retry)

    def _filesystem(self) -> Any:
        from huggingface_hub import HfFileSystem

        return HfFileSystem()

    def _list(self, url: str) -> list[Entry]:
        from huggingface_hub import HfApi
        from huggingface_hub.hf_file_system import HfFileSystemResolvedRepositoryPath

        resolved = self.fs.resolve_path(url.removeprefix("hf://"))
        if not isinstance(resolved, HfFileSystemResolvedRepositoryPath) or PINNED.search(url):
            return super()._list(url)
        commit = (
            HfApi().repo_info(resolved.repo_id, revision=resolved.revision, repo_type=resolved.repo_type).sha
        )
        shown = f"hf://{resolved.root}"
        pinned = f"hf://{resolved.root.split('@')[0]}@{commit}"
        rest = url.removeprefix("hf://").removeprefix(resolved.root)
        entries = super()._list(pinned + rest)
        return [replace(e, name=shown + e.url[len(pinned) :]) for e in entries]

    def _check(self, entry: Entry) -> None:
        if not PINNED.search(entry.url):  # a commit's files never change: nothing to check
            super()._check(entry)
