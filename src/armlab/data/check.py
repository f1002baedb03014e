"""`armlab check DIR`: can this shard dir feed a training run (of W ranks)?

Checks what the loader and the playbook's postmortem depend on: every file opens as parquet
with a string `text` column, no text is null or empty, the manifest (when there is one) matches
the files (names, sizes, rows, sha256) and says `complete`, and the (file, row group) work units can
be spread evenly over W ranks. The playbook's one-row-group-per-file shards fail the last check:
with 8 ranks and few groups, ranks run out of data at different steps (the NCCL hang).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from armlab.data.shards import MANIFEST, SHARD_GLOB, sha256_file
from armlab.errors import ArmlabError
from armlab.workdir import read_json

# Ranks get whole row groups; with fewer than this many groups per rank, the rows each rank
# sees per epoch differ by more than ~1/8 and the ranks fall out of step.
MIN_GROUPS_PER_RANK = 8
COARSE_GROUP_ROWS = 4096  # one group per file larger than this is the playbook's layout


@dataclass
class CheckResult:
    data_dir: Path
    files: int = 0
    rows: int = 0
    row_groups: int = 0
    problems: list[str] = field(default_factory=list)
    fix: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def check_data_dir(
    data_dir: str | Path, world_size: int | None = None, verify_hashes: bool = True
) -> CheckResult:
    d = Path(data_dir)
    res = CheckResult(d)
    if not d.is_dir():
        res.problems.append(f"{d}: not a directory")
        res.fix = "pass the data dir of an arm (<workdir>/arms/<arm>/data) or of a foreign shard set"
        return res
    paths = sorted(d.glob(SHARD_GLOB)) or sorted(d.glob("*.parquet"))
    if not paths:
        res.problems.append(f"{d}: no parquet shards")
        res.fix = "run `armlab prepare EXP` to write shards"
        return res
    fixes: list[str] = []
    groups_per_file: list[int] = []
    for p in paths:
        try:
            f = pq.ParquetFile(p)
        except (pa.ArrowException, OSError) as e:
            res.problems.append(f"{p.name}: not readable parquet ({str(e).splitlines()[0][:120]})")
            fixes.append("re-download or re-prepare the damaged files")
            continue
        res.files += 1
        res.rows += f.metadata.num_rows
        res.row_groups += f.num_row_groups
        groups_per_file.append(f.num_row_groups)
        field_ = f.schema_arrow.field("text") if "text" in f.schema_arrow.names else None
        if field_ is None or not (pa.types.is_string(field_.type) or pa.types.is_large_string(field_.type)):
            res.problems.append(
                f"{p.name}: no string column 'text' (columns: {', '.join(f.schema_arrow.names)})"
            )
            fixes.append("rewrite the data with `armlab prepare` (shards need a string `text` column)")
            continue
        bad = 0
        for rg in range(f.num_row_groups):
            text = f.read_row_group(rg, columns=["text"]).column(0)
            bad += text.null_count + int(pc.sum(pc.equal(pc.binary_length(text), 0)).as_py() or 0)
        if bad:
            res.problems.append(f"{p.name}: {bad} null or empty texts")
            fixes.append("re-prepare with `armlab prepare` (it drops empty texts)")
    _check_manifest(d, paths, res, fixes, verify_hashes)
    if world_size and world_size > 1 and res.row_groups:
        # One big row group per file is the playbook's layout: nanochat's loader splits each file's
        # row groups across ranks, so ranks 1.. got nothing and the run hung (Feb-18 postmortem).
        single = max(groups_per_file) == 1 and res.rows > COARSE_GROUP_ROWS * res.files
        if single or res.row_groups < world_size * MIN_GROUPS_PER_RANK:
            want = world_size * MIN_GROUPS_PER_RANK
            if single:
                layout = f"one row group per file (~{res.rows // res.files:,} rows each)"
            else:
                layout = f"{res.row_groups} row groups"
            res.problems.append(
                f"{d}: {layout} cannot feed {world_size} ranks evenly (needs >= {want} row groups: "
                f"{MIN_GROUPS_PER_RANK} per rank)"
            )
            group_rows = res.rows // want
            if group_rows >= 1:
                fixes.append(
                    f"re-shard into row groups of <= {group_rows:,} rows (shards.row_group_rows): "
                    "`armlab prepare EXP` for an arm, or declare the dir as a prebuilt arm "
                    "(kind = 'prebuilt', uri = DIR) and run `armlab prepare EXP --arm NAME`"
                )
            else:
                fixes.append(
                    f"the data has only {res.rows:,} documents, too few for {world_size} ranks: "
                    "use fewer ranks or select more data"
                )
    res.fix = "; ".join(dict.fromkeys(fixes))
    return res


def listed_file_problems(d: Path, files: list[dict], paths: list[Path]) -> list[str]:
    """Every file the manifest lists exists at its recorded size, and no shard is unlisted."""
    listed = {f["name"]: f for f in files}
    names = {p.name: p for p in paths}
    out = [f"{n}: listed in manifest.json but missing" for n in sorted(set(listed) - set(names))]
    out += [f"{n}: not listed in manifest.json" for n in sorted(set(names) - set(listed))]
    for n in sorted(set(listed) & set(names)):
        want, got = listed[n].get("bytes"), names[n].stat().st_size
        if want is not None and want != got:
            out.append(f"{n}: {got:,} bytes, manifest.json says {want:,} (truncated or replaced)")
    return out


def verify_complete(data_dir: str | Path) -> None:
    """Refuse (one line) a data dir whose manifest is not complete or whose listed files are not
    all there at their sizes: an incomplete arm must never train. Cheap (no hashing; `armlab
    check` also hashes). A dir without a manifest (foreign shards) is left to the loader."""
    d = Path(data_dir)
    try:
        m = read_json(d / MANIFEST)
    except FileNotFoundError:
        return
    files = m.get("files") if isinstance(m, dict) else None
    if not m.get("complete") or not isinstance(files, list):
        raise ArmlabError(f"{d}: data is incomplete (manifest.json not complete); rerun `armlab prepare`")
    problems = listed_file_problems(d, files, sorted(d.glob(SHARD_GLOB)))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ArmlabError(
            f"{d}: incomplete data: {problems[0]}{more}; run `armlab check {d}`, then re-prepare the arm "
            "(`armlab prepare EXP --arm ARM --overwrite`)"
        )


def _check_manifest(
    d: Path, paths: list[Path], res: CheckResult, fixes: list[str], verify_hashes: bool
) -> None:
    mpath = d / MANIFEST
    if not mpath.is_file():
        return  # a foreign dir: nothing to compare against
    m = read_json(mpath)
    files = m.get("files") if isinstance(m, dict) else None
    if not isinstance(files, list) or not all(isinstance(f, dict) and "name" in f for f in files):
        res.problems.append(f"{mpath}: not a shard manifest (no `files: [{{name, rows, sha256}}]` list)")
        fixes.append("move the foreign manifest.json away, or re-prepare the dir with `armlab prepare`")
        return
    if not m.get("complete"):
        res.problems.append(f"{mpath}: not complete (prepare was interrupted)")
        fixes.append("rerun `armlab prepare EXP` to finish it")
    listed = {f["name"]: f for f in files}
    res.problems.extend(listed_file_problems(d, files, paths))
    for p in paths:
        entry = listed.get(p.name)
        if entry is None:
            continue
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except (pa.ArrowException, OSError):
            continue  # already reported
        if rows != entry.get("rows"):
            res.problems.append(f"{p.name}: {rows} rows, manifest says {entry.get('rows')}")
        if verify_hashes and entry.get("sha256") and sha256_file(p) != entry["sha256"]:
            res.problems.append(f"{p.name}: sha256 differs from manifest.json (file changed or damaged)")
    if len(res.problems) and any("manifest" in p for p in res.problems):
        fixes.append("re-prepare the dir (`armlab prepare EXP --overwrite`) or restore the original files")
