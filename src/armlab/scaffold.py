"""`armlab init`: a commented experiment file to start from, with its columns read off the pool.

Only the pool's schema is read: the parquet footer of its first file (a ranged read of a few KB
on the hub), or the first record of a jsonl file. Columns are suggested by name and type: the
documents are a string column (`text`, `content`, ... else the largest string column), a
document id a string or integer column named like an id, a quality score a float column named
like a score, a token count an integer column named like one. The file is validated against
the spec before it is written, and an existing file is never replaced.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.data.pool import BadFile, PoolFile, describe_error, jsonl_stream, list_pool, open_source
from armlab.errors import ArmlabError
from armlab.names import MAX_NAME, check_name
from armlab.pilot import (
    ASPECT_RATIO,
    DEPTH,
    HEAD_DIM,
    MAX_PER_TASK,
    RANKS,
    VOCAB_SIZE,
    CpuPilot,
    PoolSize,
    core_check,
    size_pilot,
)
from armlab.spec import DCLM_EVAL_BUNDLE_URL, PoolSpec, parse_experiment
from armlab.store.redact import redact
from armlab.text import plural

TEXT_NAMES = ("text", "content", "document", "raw_content", "body", "markdown")
ID_NAMES = ("id", "doc_id", "document_id", "docid", "uid", "uuid", "guid", "_id")
SCORE_WORDS = ("score", "quality", "qurating", "rating", "prob", "edu")
TOKEN_WORDS = ("token",)
EVAL_DOCS = 20_000  # the spec's default; a small pool gets 5% of its documents instead


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "string" | "int" | "float" | "bool" | "other"
    type: str  # the type as the pool declares it, for the comment
    size: int = 0  # bytes of the column in the first file (parquet: uncompressed; jsonl: first value)


@dataclass(frozen=True)
class Columns:
    """The columns of the pool's first file, and the ones `init` suggests for each role."""

    all: tuple[Column, ...]
    text: str | None
    id: str | None
    score: str | None
    token_count: str | None


@dataclass(frozen=True)
class PoolSummary:
    uri: str
    files: int
    bytes: int
    fmt: str
    first_rows: int | None  # rows of the first file (parquet footer); None for jsonl
    columns: Columns


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return "other"


def _pick(cols: list[Column], kinds: tuple[str, ...], names: tuple[str, ...], words: tuple[str, ...]) -> str | None:
    """The first column of an allowed kind named exactly as in `names` (in that order), else the
    first whose name contains one of `words`."""
    ok = [c for c in cols if c.kind in kinds]
    by_name = {c.name.lower(): c.name for c in ok}
    for n in names:
        if n in by_name:
            return by_name[n]
    for c in ok:
        if any(w in c.name.lower() for w in words):
            return c.name
    return None


def suggest_columns(cols: list[Column]) -> Columns:
    """Which column holds the documents, the ids, a score and token counts (None where none fits)."""
    text = _pick(cols, ("string",), TEXT_NAMES, ())
    strings = [c for c in cols if c.kind == "string"]
    if text is None and strings:
        text = max(strings, key=lambda c: c.size).name  # the documents are the bulk of the bytes
    rest = [c for c in cols if c.name != text]
    ident = _pick(rest, ("string", "int"), ID_NAMES, ())
    if ident is None:
        ident = next((c.name for c in rest if c.kind in ("string", "int") and c.name.lower().endswith("_id")), None)
    score = _pick(rest, ("float",), ("score",), SCORE_WORDS) or _pick(rest, ("int",), (), SCORE_WORDS)
    tokens = _pick([c for c in rest if c.name != score], ("int",), ("token_count",), TOKEN_WORDS)
    return Columns(all=tuple(cols), text=text, id=ident, score=score, token_count=tokens)


def _parquet_columns(pf: PoolFile) -> tuple[list[Column], int]:
    with open_source(pf) as src:
        f = pq.ParquetFile(src)  # the footer only
        md, schema = f.metadata, f.schema_arrow
    sizes: dict[str, int] = {}
    for rg in range(md.num_row_groups):
        for i in range(md.num_columns):
            col = md.row_group(rg).column(i)
            top = col.path_in_schema.split(".")[0]
            sizes[top] = sizes.get(top, 0) + col.total_uncompressed_size
    cols = [Column(f.name, _kind(f.type), str(f.type), sizes.get(f.name, 0)) for f in schema]
    return cols, md.num_rows


def _jsonl_columns(pf: PoolFile) -> list[Column]:
    with open_source(pf) as src, jsonl_stream(src, pf) as stream:
        buf = b""
        while b"\n" not in buf.lstrip(b"\r\n \t"):  # read up to the end of the first non-blank line
            chunk = stream.read(1 << 16)
            if not chunk:
                break
            buf += chunk
    line = buf.lstrip(b"\r\n \t").split(b"\n", 1)[0]
    if not line.strip():
        raise ArmlabError(f"{pf.name}: empty file; --from needs a pool whose first file has a record")
    try:
        first = json.loads(line)
    except ValueError as e:
        raise ArmlabError(f"{pf.name}: the first line is not JSON ({e})") from None
    if not isinstance(first, dict):
        raise ArmlabError(f"{pf.name}: the first line is not a JSON object")
    kinds = {bool: "bool", int: "int", float: "float", str: "string"}
    return [
        Column(k, kinds.get(type(v), "other"), type(v).__name__, len(v) if isinstance(v, str) else 0)
        for k, v in first.items()
    ]


def read_pool(uri: str) -> PoolSummary:
    """List the pool and read the schema of its first file (no data is read)."""
    files = list_pool(PoolSpec(uri=uri))
    first = files[0]
    try:
        if first.fmt == "parquet":
            cols, rows = _parquet_columns(first)
        else:
            cols, rows = _jsonl_columns(first), None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BadFile(first.name, describe_error(e)) from None
    # The file written holds no secret: a token in the URL becomes *** (name it as ${VAR} instead).
    return PoolSummary(redact(uri), len(files), sum(f.size for f in files), first.fmt, rows, suggest_columns(cols))


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string


def pool_size(pool: PoolSummary | None) -> PoolSize:
    """Documents and their mean length, from the first file (its rows x the number of files)."""
    if pool is None:
        return PoolSize(None, None)
    text = next((col for col in pool.columns.all if col.name == pool.columns.text), None)
    docs = pool.first_rows * pool.files if pool.first_rows else None
    per_doc = text.size / pool.first_rows if text and text.size and pool.first_rows else None
    if pool.first_rows is None and text and text.size:  # jsonl: the first record's length
        per_doc = float(text.size)
    return PoolSize(docs, per_doc)


def experiment_text(name: str, pool: PoolSummary | None, pilot: CpuPilot | None = None) -> str:
    """The commented experiment file (TOML) for `pool`, or a template to fill in without one;
    with `pilot`, sized to run on a CPU as it is (armlab.pilot)."""
    c = pool.columns if pool else None
    lines = [f"# armlab experiment {name!r}, written by `armlab init`."]
    if pool:
        rows = f", {plural(pool.first_rows, 'row')} in the first" if pool.first_rows is not None else ""
        lines.append(f"# Pool: {pool.uri} ({plural(pool.files, 'file')}, {pool.bytes / 1e6:,.1f} MB{rows}).")
    lines += [
        "# `armlab plan FILE` shows what each arm holds and what one run consumes; every key is",
        "# documented in docs/DESIGN.md and used in examples/fineweb-edu-top-vs-random.toml.",
        f"name = {_q(name)}",
        f'# workdir = "~/.cache/armlab/{name}"   # data, runs and the report (this is the default)',
        "",
        "[pool]",
    ]
    if pool is None:
        lines += [
            'uri = "hf://datasets/<owner>/<dataset>/data/**/*.parquet"   # or local files, a dir or a glob',
            'text_column = "text"',
            '# id_column = "id"                  # else a document is identified by a hash of its text',
            '# token_count_column = "token_count"',
            "# `armlab init FILE --from POOL` fills these in from the pool's own columns.",
        ]
    else:
        lines.append(f"uri = {_q(pool.uri)}")
        if c.text:
            lines.append(f"text_column = {_q(c.text)}            # the documents")
        else:
            lines.append('text_column = "text"   # FIXME: the first file has no string column; name the documents\' column')
        if c.id:
            lines.append(f"id_column = {_q(c.id)}              # identifies a document (eval set, arms, overlap)")
        else:
            lines.append("# id_column =                 # no id-like column: a hash of the text identifies a document")
        if c.token_count:
            lines.append(f"token_count_column = {_q(c.token_count)}   # lets `plan` and `by = \"tokens\"` count without tokenizing")
        lines.append("# columns: " + ", ".join(f"{col.name} ({col.type})" for col in c.all))
    est = pool.first_rows * pool.files if pool and pool.first_rows else None
    docs = EVAL_DOCS if est is None else max(1, min(EVAL_DOCS, est // 20))
    if pilot:
        docs = pilot.eval_docs
    lines += [
        "",
        "[eval]",
        f"docs = {docs}   # held out of the pool before any arm is selected; every arm is scored on it",
        "",
        "[tokenizer]",
    ]
    if pilot:
        lines += [
            f"vocab_size = {VOCAB_SIZE}            # CPU pilot: a small vocabulary keeps the embeddings cheap",
            f"train_chars = {pilot.train_chars:_}   # characters of a neutral pool sample the BPE tokenizer trains on",
            "",
            "[shards]",
            "rows_per_shard = 1024",
            "row_group_rows = 128         # many row groups, so a small arm feeds 1 or 2 ranks",
            "",
        ]
    else:
        lines += [
            "# vocab_size = 32768",
            "# train_chars = 2_000_000_000   # characters of a neutral pool sample the BPE tokenizer trains on",
            "",
        ]
    cap = (
        [f"max_tokens = {pilot.arm_tokens}         # CPU pilot: a sample of the arm, twice what one run reads"]
        if pilot
        else []
    )
    score = c.score if c else None
    if score:
        lines += [
            "[[arms]]",
            'name = "top50"',
            'kind = "top"                 # the top share of the pool by score_column (exact global threshold)',
            "ratio = 0.5",
            f"score_column = {_q(score)}",
            *cap,
            "",
        ]
    lines += [
        "[[arms]]",
        'name = "random50"',
        'kind = "random"              # a uniform sample: the baseline every other arm is compared with',
        "ratio = 0.5                  # share of the pool (after the eval set) the arm takes",
        "seed = 42",
        *cap,
    ]
    if not score:
        lines += [
            "",
            "# [[arms]]                   # no score-like column found; name yours to compare against random",
            '# name = "top50"',
            '# kind = "top"',
            "# ratio = 0.5",
            '# score_column = "score"',
        ]
    lines += _pilot_sections(pilot) if pilot else [
        "",
        "# [[scorers]]                # a model to select on: `armlab score`, then an arm with score = \"dclm\"",
        '# name = "dclm"',
        '# kind = "fasttext"          # fasttext | hf (a hub or saved classifier) | head (over an embedding column)',
        '# model = "https://huggingface.co/mlfoundations/fasttext-oh-eli5/resolve/main/openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin"',
        '# label = "__label__hq"      # the score: its probability (DCLM\'s quality classifier)',
        "",
        "[model]",
        "# depth = 20                 # nanochat's GPT; width = depth x 64",
        "# max_seq_len = 2048",
        "",
        "[train]",
        "# device_batch_size = 32",
        "# total_batch_size = 524288  # default: nanochat's auto batch size",
        "# num_iterations = 1000      # the horizon (default: nanochat's tokens-per-parameter ratio)",
        "seeds = [0, 1]               # a difference is only trusted with more than one seed per arm",
        "",
        "# [evaluate]",
        '# core_bundle = "none"       # CORE off (val bpb only); default: DCLM\'s bundle, downloaded once',
        "",
        "# [[hosts]]                  # for `armlab launch`: one arm per SSH host",
        '# name = "gpu-a"',
        '# ssh = "ubuntu@gpu-a"',
        '# arms = ["random50"]',
        "# num_gpus = 8",
    ]  # fmt: skip
    return "\n".join(_align(line) for line in lines) + "\n"


def _pilot_sections(p: CpuPilot) -> list[str]:
    """[model], [train] and [evaluate] of a CPU pilot, each number with its reason (armlab.pilot)."""
    lines = [
        "",
        "[model]                      # CPU pilot: ~2M parameters (a real run is d12 and up, on GPUs)",
        f"depth = {DEPTH}",
        f"aspect_ratio = {ASPECT_RATIO}             # width = depth x {ASPECT_RATIO} = {DEPTH * ASPECT_RATIO}: two heads of {HEAD_DIM}",
        f"head_dim = {HEAD_DIM}",
        f"max_seq_len = {p.max_seq_len}",
        "",
        "[train]",
        f"device_batch_size = {p.device_batch_size}",
        f"total_batch_size = {p.total_batch_size}      # = {p.device_batch_size} x {p.max_seq_len} x {RANKS}: one or two ranks split it",
        f"num_iterations = {p.num_iterations}         # the arms feed this many steps (plan: time on this CPU)",
        f"warmup_steps = {p.warmup_steps}            # 5% of the steps: warmup + warmdown (65%) fit the horizon",
        f"eval_every = {p.every}              # val bpb four times a run",
        f"eval_tokens = {p.eval_tokens}           # fits in the eval set",
        f"save_every = {p.every}              # a checkpoint every quarter: a stopped run resumes there",
        "seeds = [0, 1]               # a difference is only trusted with more than one seed per arm",
    ]  # fmt: skip
    if p.allow_repeat:
        lines.append("allow_repeat = true          # the pool is small: a run sees its arm more than once")
    lines += ["", "[evaluate]"]
    if p.core_bundle == "none":
        lines += [f'core_bundle = "none"         # CORE off, val bpb only: {p.core_reason}']
    else:
        lines += [f"max_per_task = {MAX_PER_TASK}            # CORE on a CPU: {MAX_PER_TASK} items a task ({p.core_reason})"]
    return lines


def _align(line: str, column: int = 32) -> str:
    """`key = value   # why` with the comments of a file lined up at `column`."""
    m = re.match(r"^(#? ?[a-z_]+ = (?:\"[^\"]*\"|\[[^\]]*\]|\S+))\s+(# .*)$", line)
    return f"{m[1]:<{column - 1}} {m[2]}" if m else line


def experiment_name(path: Path) -> str:
    """The experiment's name from its file name: `my exp.toml` -> `my-exp`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-._")[:MAX_NAME].rstrip("-._")
    return check_name(name or "experiment", "experiment name")


def gpu_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def init_experiment(path: str | Path, pool_uri: str | None = None, cpu: bool | None = False) -> CpuPilot | None:
    """Write a commented experiment file at `path` (never over an existing file). `cpu`: sized to
    run on this machine's CPU as it is (armlab.pilot); None: so when no GPU is visible here.
    Returns the pilot's numbers (None: the GPU template)."""
    import tomllib

    path = Path(path)
    if path.exists() or path.is_symlink():
        raise ArmlabError(f"{path}: already exists; choose another file name (init never overwrites)")
    if not path.parent.is_dir():
        raise ArmlabError(f"{path.parent}: no such directory; create it first or choose another path")
    pool = read_pool(pool_uri) if pool_uri else None
    if cpu is None:
        cpu = not gpu_visible()
    pilot = size_pilot(pool_size(pool), 0.5, core_check(DCLM_EVAL_BUNDLE_URL)) if cpu else None
    text = experiment_text(experiment_name(path), pool, pilot)
    parse_experiment(tomllib.loads(text), f"armlab init (for {path})")  # the template must be a valid spec
    # Temp file, then a hard link to the real name: atomic, and it fails if the name was taken meanwhile.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; an experiment file is shared like any other
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ArmlabError(f"{path}: already exists; choose another file name (init never overwrites)") from None
    finally:
        os.unlink(tmp)
    return pilot
