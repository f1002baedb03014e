"""The per-run nanochat base dir: what `NANOCHAT_BASE_DIR` points at for one run.

nanochat reads everything from one base dir (default `~/.cache/nanochat`, shared by every run
on the machine: the playbook's repointed `base_data` symlink). armlab gives each run its own,
inside the run dir, so no global state is ever touched (DESIGN.md invariant 5):

    <run>/nanochat_base/
        base_data/            the arm's shards (symlinks, in the run's data order) + val_shared_eval.parquet
                              + data_order.json                                    (48804bf reads this)
        base_data_climbmix/   the same                                             (92d63d4 reads this)
        tokenizer/            -> the experiment's tokenizer dir (tokenizer.pkl, token_bytes.pt)
        eval_bundle/          -> the experiment's CORE bundle (placed by `armlab evaluate`)
        base_checkpoints/<model tag>/model_<step>.pt, meta_<step>.json, optim_<step>_rank<r>.pt
        base_eval/base_model_<step>.csv   (written by scripts.base_eval)

nanochat's dataset uses the LAST parquet file of the data dir (sorted by name) as its
validation split and trains on all the others. So the shared eval set is written as one file
whose name sorts after every shard: every arm is validated on the same held-out documents,
never on its own last shard.

nanochat reads its training files in that sorted order and has no seed for it (nor for init: it
seeds 42), so two seeds of an arm would be one run twice. armlab varies the data order per run
through the link names: `shard_00000.parquet`, `shard_00001.parquet`, ... point at the arm's shards
in an order set by the run's data seed (`file_order`: another first file for each of seeds 0..n-1,
the rest shuffled; written to `data_order.json`), so nanochat reads the files in another order for
every seed. Within a file nanochat's order stays its
own (row groups in order), so an arm of one shard file cannot be varied this way (and two seeds
whose shuffles coincide, likely with 2-3 files, train alike): `order_collisions` names them, the
engine warns before it starts, and `compare` counts runs with identical loss curves once.

nanochat's loader gives rank r the row groups r, r+W, r+2W, ... of each file in turn. A rank
that no file has a row group for never gets a batch and the others wait for it in the first
collective forever (the playbook's DDP hang). `check_feeds` refuses such a layout before
nanochat starts, and the eval file is written with at least W row groups.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from armlab.errors import ArmlabError
from armlab.workdir import atomic_path, atomic_write_json, read_json

DATA_DIRS = ("base_data", "base_data_climbmix")  # 48804bf's, then 92d63d4's (it falls back to the first)
VAL_FILE = "val_shared_eval.parquet"  # sorts after every `shard_*.parquet`
VAL_RECORD = "val_shared_eval.json"  # what the eval file was written from (reused when unchanged)
ORDER_RECORD = "data_order.json"  # the run's file order: {"data_seed", "files": [arm file names in read order]}
ORDER_SALT = 0x0D  # the file order's hash stream (not the loader's or the selection's)
CHECKPOINT_RE = re.compile(r"^model_(\d+)\.pt$")


@dataclass(frozen=True)
class BaseDir:
    root: Path

    @classmethod
    def of_run(cls, run_dir: Path) -> BaseDir:
        return cls(Path(run_dir) / "nanochat_base")

    def data_dir(self, name: str = DATA_DIRS[0]) -> Path:
        return self.root / name

    @property
    def val_file(self) -> Path:
        return self.data_dir() / VAL_FILE

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def eval_bundle(self) -> Path:
        return self.root / "eval_bundle"

    def checkpoints(self, model_tag: str) -> Path:
        return self.root / "base_checkpoints" / model_tag

    def base_eval_csv(self, step: int) -> Path:
        return self.root / "base_eval" / f"base_model_{step:06d}.csv"


def train_files(data_dir: Path) -> list[Path]:
    """The arm's shard files nanochat trains on, in nanochat's (sorted-name) order."""
    from armlab.train.units import list_units

    files, _ = list_units(data_dir)  # refuses an incomplete, empty or foreign data dir
    return files


def check_feeds(data_dir: Path, world_size: int) -> list[Path]:
    """Refuse an arm nanochat's loader cannot feed on `world_size` ranks (see the module docstring)."""
    from armlab.train.units import check_feeds as check_units

    check_units(data_dir, world_size)  # armlab's own rule: at least one row group per rank
    files = train_files(data_dir)
    groups = [pq.ParquetFile(f).metadata.num_row_groups for f in files]
    if max(groups) < world_size:
        raise ArmlabError(
            f"{data_dir}: its largest shard has {max(groups)} row group{'s' if max(groups) != 1 else ''}, but "
            f"nanochat's loader strides the row groups of each file by rank, so ranks {max(groups)}..{world_size - 1} "
            f"of {world_size} would get no data and hang; re-shard with `armlab prepare` (smaller "
            f"shards.row_group_rows) or train on at most {max(groups)} GPU(s)"
        )
    return files


def file_order(n: int, data_seed: int) -> list[int]:
    """The order (indices into the arm's sorted files) nanochat reads n files in, for a data seed:
    file `data_seed mod n` first, then the others in an order shuffled by the seed. nanochat reads a
    file whole before the next, so the first file decides the start of training: seeds 0..n-1 start
    on n different files (a plain shuffle of 3 files starts seeds 0 and 1 on the same one)."""
    from armlab.data.identity import mix

    first = data_seed % n
    rest = [i for i in range(n) if i != first]
    keys = mix(np.asarray(rest, dtype=np.uint64), data_seed, salt=ORDER_SALT)
    return [first, *(rest[int(i)] for i in np.argsort(keys, kind="stable"))]


def order_collisions(n: int, data_seed: int, other_seeds: list[int]) -> list[int]:
    """The data seeds among `other_seeds` whose file order for n files is this seed's (same runs)."""
    mine = file_order(n, data_seed)
    return [s for s in other_seeds if s != data_seed and file_order(n, s) == mine]


def link_name(position: int) -> str:
    return f"shard_{position:05d}.parquet"


def _eval_files(eval_dir: Path) -> list[Path]:
    files = sorted(Path(eval_dir).glob("shard_*.parquet"))
    if not files:
        raise ArmlabError(f"{eval_dir}: the shared eval set has no shards; run `armlab prepare EXP`")
    return files


def write_val_file(eval_dir: Path, dest: Path, world_size: int, row_group_rows: int) -> int:
    """The shared eval set as one parquet file (`text` only, eval-set order) with at least
    `world_size` row groups; reused when written from the same eval set for the same layout.
    Returns its document count."""
    manifest = (Path(eval_dir) / "manifest.json").read_bytes()
    want = {"eval_manifest_sha256": hashlib.sha256(manifest).hexdigest(), "world_size": world_size,
            "row_group_rows": row_group_rows}  # fmt: skip
    record = dest.parent / VAL_RECORD
    if dest.is_file() and record.is_file():
        old = read_json(record)
        if all(old.get(k) == v for k, v in want.items()):
            return int(old["docs"])
    texts = pa.concat_arrays(
        [pq.read_table(f, columns=["text"]).column("text").combine_chunks() for f in _eval_files(eval_dir)]
    )
    n = len(texts)
    if n < world_size:
        raise ArmlabError(
            f"{eval_dir}: the shared eval set holds {n} documents, fewer than the {world_size} ranks nanochat "
            "validates on; raise eval.docs and rerun `armlab prepare EXP`"
        )
    rows = min(row_group_rows, math.ceil(n / world_size))
    while math.ceil(n / rows) < world_size:  # n=9, W=4: 3 rows a group make only 3 groups
        rows -= 1
    with atomic_path(dest) as tmp:
        pq.write_table(pa.table({"text": texts}), tmp, row_group_size=rows, compression="zstd")
    atomic_write_json(record, {**want, "docs": n, "rows_per_group": rows})
    return n


def _relink(link: Path, target: Path) -> None:
    """Point `link` at `target` (replacing whatever was there)."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, link)


def build(
    base: BaseDir,
    data_dir: Path,
    eval_dir: Path,
    tokenizer_dir: Path,
    world_size: int,
    row_group_rows: int,
    data_seed: int = 0,
) -> list[str]:
    """Write the run's base dir: the arm's shards linked in the data seed's order and the eval
    file, in both data dirs; the tokenizer link. Rebuilt on every start (a resume sees the same
    links: the arm is leased, its manifest checked, the order a function of the seed). Returns the
    arm's file names in the order nanochat will read them."""
    files = check_feeds(data_dir, world_size)
    order = [files[i] for i in file_order(len(files), data_seed)]
    first = base.data_dir(DATA_DIRS[0])
    first.mkdir(parents=True, exist_ok=True)
    write_val_file(eval_dir, first / VAL_FILE, world_size, row_group_rows)
    for name in DATA_DIRS:
        d = base.data_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        keep = {link_name(i) for i in range(len(order))} | {VAL_FILE}
        for old in d.iterdir():  # links of files the arm no longer has
            if old.name not in keep and old.name not in (VAL_RECORD, ORDER_RECORD):
                old.unlink()
        for i, f in enumerate(order):
            _relink(d / link_name(i), f.resolve())
        if name != DATA_DIRS[0]:
            _relink(d / VAL_FILE, Path("..") / DATA_DIRS[0] / VAL_FILE)
    names = [f.name for f in order]
    atomic_write_json(first / ORDER_RECORD, {"data_seed": data_seed, "files": names})
    _relink(base.tokenizer, Path(tokenizer_dir).resolve())
    return names


def place_bundle(base: BaseDir, bundle_root: Path | None) -> None:
    """Where nanochat's CORE eval looks (`<base>/eval_bundle`): the experiment's bundle, or
    nothing (then armlab tells nanochat not to run CORE, which would download its own)."""
    if bundle_root is None:
        with contextlib.suppress(FileNotFoundError):
            base.eval_bundle.unlink()
        return
    _relink(base.eval_bundle, Path(bundle_root).resolve())


def val_texts(base: BaseDir) -> list[str]:
    """The documents of the run's val file (what nanochat validated on)."""
    return pq.read_table(base.val_file, columns=["text"]).column("text").to_pylist()


# -- checkpoints ----------------------------------------------------------------------------------
def checkpoint_steps(ckpt_dir: Path, world_size: int) -> list[int]:
    """Steps of the complete checkpoints nanochat saved, ascending.

    nanochat writes model_<step>.pt, then meta_<step>.json, then one optim_<step>_rank<r>.pt per
    rank, none of them atomically: a step counts only when all of them exist, the meta parses and
    each .pt is a whole zip archive (torch.save's format; a kill -9 mid-save leaves one without its
    central directory, which torch.load then refuses and the resume would fail on).
    """
    if not ckpt_dir.is_dir():
        return []
    steps = []
    for p in ckpt_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if not m:
            continue
        step = int(m.group(1))
        meta = ckpt_dir / f"meta_{step:06d}.json"
        optims = [ckpt_dir / f"optim_{step:06d}_rank{r}.pt" for r in range(world_size)]
        if not meta.is_file() or not all(o.is_file() and zipfile.is_zipfile(o) for o in [p, *optims]):
            continue
        try:
            json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        steps.append(step)
    return sorted(steps)
