"""The scores a scorer wrote: one sidecar file per pool file, and a manifest (DESIGN.md "Scores").

Layout of a scorer's dir (`<scores_dir>/<scorer>/`, default scores_dir <workdir>/scores):

    manifest.json                  the scorer, its identity, the model's sha256, per pool file:
                                   its content identity, rows, unscored rows, sidecar path
    files/<pool file>.parquet      per pool file (its path relative to the pool's root; ".parquet"
                                   appended to other names): columns `key` uint64 (the document's
                                   identity, data/identity.py) and `score` float32 (NaN: no
                                   score), one row per pool row in the pool file's own order
    parts/...                      a large file's row-group ranges while it is being scored
    .lock                          one `armlab score` of this scorer at a time

Rows aligned with the pool file make the join in prepare's key pass positional (no sort, no
hash table: memory is one file's keys), and the stored keys check it: prepare refuses a sidecar
whose keys are not the file's. 12 bytes a document (3.9 GB for fineweb-edu-fortified's 324M),
uncompressed (random floats and hashes do not compress). Each sidecar's footer carries what it
was computed from (the pool file's relative name and content identity, the scorer's identity),
so a sidecar left by a killed run is adopted by the next, and a stale one is never read.

The scorer's identity is a fingerprint of what the scores depend on: its kind, its model (a local
model's content hash, a URL, or `hub:<id>@<revision>`), its label and the backend's settings
(max_length, the text / embedding column, preprocessing) and the pool's id column (the keys).
Not the batch size, the workers or the executor: the sidecars are the same bytes for any of those.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from armlab.data.pool import PoolFile, split_uri
from armlab.errors import ArmlabError
from armlab.names import check_name
from armlab.spec import Experiment, ScorerSpec, fingerprint
from armlab.workdir import atomic_path, atomic_write_json, read_json

SCORES_VERSION = 1
MANIFEST = "manifest.json"
META_KEY = b"armlab.scores"
SCHEMA = pa.schema([pa.field("key", pa.uint64(), nullable=False), pa.field("score", pa.float32())])
LAYOUT = (
    "files/<pool file relative to the pool's root>[.parquet]: columns key (uint64, the document's "
    "identity) and score (float32, NaN = no score), one row per pool row in the pool file's order"
)


def scorer_dir(exp: Experiment, name: str) -> Path:
    return exp.scores_path / check_name(name, "scorer name")  # never a path out of the scores dir


def relative_names(uri: str, files: list[PoolFile]) -> dict[str, str]:
    """Each pool file's path relative to the pool's root (the URI up to its first glob, or its
    dir): what names its sidecar, the same wherever the pool is mounted."""
    _, path = split_uri(uri)
    cut = min((path.find(c) for c in "*?[" if c in path), default=-1)
    root = path[:cut].rsplit("/", 1)[0] if cut >= 0 else path.rstrip("/")
    out: dict[str, str] = {}
    for pf in files:
        _, p = split_uri(pf.path)
        rel = p[len(root) :].lstrip("/") if p.startswith(root) and p != root else Path(p).name
        if not rel or ".." in Path(rel).parts:
            rel = Path(p).name
        out[pf.name] = rel
    if len(set(out.values())) < len(out):
        raise ArmlabError(
            f"pool.uri {uri!r}: two pool files have the same relative name; cannot name their scores"
        )
    return out


def sidecar_rel(rel: str) -> str:
    return f"files/{rel}" if rel.endswith(".parquet") else f"files/{rel}.parquet"


def identity(scorer: ScorerSpec, exp: Experiment, model_ref: str) -> str:
    from armlab.data.score.backends import get_backend

    backend = get_backend(scorer.kind)
    return fingerprint(
        {
            "version": SCORES_VERSION,
            "kind": scorer.kind,
            "model": model_ref,
            "id_column": exp.pool.id_column,
            **backend.identity(scorer, exp.pool),
        }
    )


# -- the manifest ------------------------------------------------------------------------------------
@dataclass
class ScoredFile:
    identity: str  # the pool file's content identity when scored
    rows: int
    unscored: int  # rows without a score (null text or embedding)
    sidecar: str  # relative to the scorer's dir
    dtype: str = "unknown"  # what the model computed in (hf: bfloat16 on CUDA, float32 on CPU)


@dataclass
class ScoresManifest:
    scorer: dict[str, Any]  # the [[scorers]] table
    identity: str
    model: dict[str, str]  # source, sha256, ref (models.describe)
    pool: dict[str, Any]  # uri, id_column, the column the scores read
    files: dict[str, ScoredFile] = field(default_factory=dict)  # relative name -> what was scored
    last_run: dict[str, Any] = field(default_factory=dict)  # docs/s, workers, device of the last run
    version: int = SCORES_VERSION
    layout: str = LAYOUT

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["files"] = {k: asdict(v) for k, v in sorted(self.files.items())}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScoresManifest:
        files = {k: ScoredFile(**v) for k, v in d.get("files", {}).items()}
        return cls(**{**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}, "files": files})

    def write(self, directory: Path) -> None:
        atomic_write_json(directory / MANIFEST, self.to_json())


def read_manifest(directory: Path) -> ScoresManifest | None:
    try:
        return ScoresManifest.from_json(read_json(directory / MANIFEST))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError) as e:
        raise ArmlabError(
            f"{directory / MANIFEST}: unreadable scores manifest ({e}); delete it and score again"
        ) from None


# -- sidecar files ----------------------------------------------------------------------------------
def write_sidecar(path: Path, keys: np.ndarray, scores: np.ndarray, meta: dict[str, Any]) -> None:
    """One sidecar (or part) atomically: key + score columns, what they came from in the footer."""
    table = pa.table(
        {"key": pa.array(keys, pa.uint64()), "score": pa.array(scores, pa.float32())}, schema=SCHEMA
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False)


def sidecar_meta(path: Path) -> dict[str, Any] | None:
    """What a sidecar says it was computed from; None when absent or unreadable."""
    try:
        meta = pq.read_schema(path).metadata or {}
        return json.loads(meta[META_KEY])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def read_sidecar(path: Path, expect: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(keys, scores) of a sidecar whose footer matches `expect` (else ArmlabError naming both)."""
    meta = sidecar_meta(path)
    diff = sorted(k for k in expect if (meta or {}).get(k) != expect[k])
    if meta is None or diff:
        what = "is missing or unreadable" if meta is None else f"was computed from another {', '.join(diff)}"
        raise ArmlabError(f"{path}: {what}; run `armlab score EXP --scorer {expect.get('scorer_name', '?')}`")
    t = pq.read_table(path, use_threads=False)
    return t.column("key").to_numpy(), t.column("score").to_numpy().astype(np.float64)


def concat_parts(parts: list[Path], out: Path, meta: dict[str, Any]) -> None:
    """A file scored in row-group ranges: its parts, in order, as one sidecar."""
    tables = [pq.read_table(p, use_threads=False) for p in parts]
    t = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    write_sidecar(out, t.column("key").to_numpy(), t.column("score").to_numpy(), meta)


def file_meta(
    rel: str, pf: PoolFile, scorer: str, ident: str, rows: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The footer of a sidecar (rows: a part's row-group range)."""
    meta: dict[str, Any] = {
        "pool_file": rel,
        "file_identity": pf.identity,
        "scorer": ident,
        "scorer_name": scorer,
    }
    if rows is not None:
        meta["row_groups"] = list(rows)
    return meta
