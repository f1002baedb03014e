"""The experiment file: TOML -> validated pydantic model, defaults and fingerprints.

The names here are the contract of DESIGN.md ("The experiment file"). Every model forbids
unknown keys, so a typo such as `rows_per_shrad` is an error naming the key, not a silently
ignored setting. `load_experiment` turns every validation problem into one `ArmlabError` line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from armlab.errors import ArmlabError
from armlab.text import closest
from armlab.vocab import MIN_VOCAB_SIZE

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
RESERVED_ARM_NAMES = ("eval", "tokenizer")  # prepare's own targets (the eval set, the tokenizer sample)
# nanochat's --target-param-data-ratio default since 2026-03-24 (92d63d4: 12; before: 10.5)
DEFAULT_PARAM_DATA_RATIO = 12.0


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PoolSpec(Strict):
    """The corpus every arm is drawn from."""

    uri: str
    text_column: str = "text"
    id_column: str | None = None
    token_count_column: str | None = None
    format: Literal["auto", "parquet", "jsonl"] = "auto"
    # Remote parquet: "columns" reads only the column chunks each pass needs (ranged requests);
    # "files" downloads whole files first, for stores without Range support.
    fetch: Literal["columns", "files"] = "columns"


class EvalSpec(Strict):
    """Shared held-out eval set, drawn from the pool before any arm is selected."""

    docs: int = Field(20_000, gt=0)
    seed: int = 0


class TokenizerSpec(Strict):
    """BPE tokenizer trained once on a neutral sample of the pool (never an arm, never eval)."""

    vocab_size: int = Field(32_768, ge=MIN_VOCAB_SIZE)  # 256 byte tokens + the special tokens
    train_chars: int = Field(2_000_000_000, gt=0)
    doc_cap: int = Field(10_000, gt=0)  # chars taken from any one document (nanochat's choice)
    seed: int = 0


class ShardSpec(Strict):
    rows_per_shard: int = Field(14_000, gt=0)
    row_group_rows: int = Field(1024, gt=0)
    compression: Literal["zstd", "snappy", "none"] = "zstd"

    @model_validator(mode="after")
    def _groups_fit(self) -> ShardSpec:
        if self.row_group_rows > self.rows_per_shard:
            raise ValueError(
                f"shards.row_group_rows ({self.row_group_rows}) must be <= shards.rows_per_shard "
                f"({self.rows_per_shard})"
            )
        return self


ArmKind = Literal["random", "top", "sample", "prebuilt"]


class ArmSpec(Strict):
    name: str
    kind: ArmKind
    ratio: float | None = None
    seed: int = 0
    score_column: str | None = None
    temperature: float = Field(1.0, gt=0)
    by: Literal["rows", "tokens"] = "rows"
    max_rows: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    # prebuilt arms
    uri: str | None = None
    download_mode: Literal["bulk", "sequential"] = "bulk"
    concurrency: int = Field(8, gt=0)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"arm name {v!r} must be letters, digits, '.', '_' or '-'")
        if v in RESERVED_ARM_NAMES:
            raise ValueError(f"arm name {v!r} is reserved (prepare's eval set and tokenizer sample); rename the arm")
        return v

    @field_validator("ratio")
    @classmethod
    def _ratio_ok(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"must be in (0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _kind_fields(self) -> ArmSpec:
        if self.kind == "prebuilt":
            if not self.uri:
                raise ValueError(
                    f"arm {self.name!r}: kind 'prebuilt' needs uri (az://container/prefix or a dir)"
                )
            if self.ratio is not None or self.score_column is not None:
                raise ValueError(f"arm {self.name!r}: kind 'prebuilt' takes no ratio or score_column")
        else:
            if self.ratio is None:
                raise ValueError(f"arm {self.name!r}: kind {self.kind!r} needs ratio")
            if self.uri is not None:
                raise ValueError(f"arm {self.name!r}: uri is only for kind 'prebuilt'")
        if self.kind in ("top", "sample") and not self.score_column:
            raise ValueError(f"arm {self.name!r}: kind {self.kind!r} needs score_column")
        if self.kind == "random" and self.score_column:
            raise ValueError(f"arm {self.name!r}: kind 'random' takes no score_column")
        return self


class ModelSpec(Strict):
    depth: int = Field(20, gt=0)
    max_seq_len: int = Field(2048, gt=0)
    aspect_ratio: int = Field(64, gt=0)  # model_dim = depth * aspect_ratio, rounded up to head_dim
    head_dim: int = Field(128, gt=0)
    # Sliding-window attention, tiled over the layers (the last layer is always L): L = full
    # context, S = a quarter of it. None: the engine's default (nanochat 92d63d4: "SSSL").
    window_pattern: str | None = None

    @field_validator("window_pattern")
    @classmethod
    def _pattern_ok(cls, v: str | None) -> str | None:
        if v is not None and (not v or set(v.upper()) - {"S", "L"}):
            raise ValueError(f"must be a non-empty string of S (short window) and L (full context), got {v!r}")
        return v.upper() if v is not None else None


class TrainSpec(Strict):
    # What trains the model (armlab.train.engines): armlab's own trainer, or the researcher's
    # nanochat checkout ([nanochat]). Part of the fingerprint: runs of two engines never compare.
    engine: Literal["builtin", "nanochat"] = "builtin"
    device_batch_size: int = Field(32, gt=0)
    total_batch_size: int | None = Field(None, gt=0)  # None: nanochat's auto batch size
    target_param_data_ratio: float | None = Field(None, gt=0)  # default 12 when nothing else set
    tokens: int | None = Field(None, gt=0)
    num_iterations: int | None = Field(None, gt=0)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Data-order seeds, paired with `seeds` by position: run k initialises from seeds[k] and reads
    # its arm in the order of data_seeds[k]. None: each seed is both (the default). The nanochat
    # engine has a fixed init seed, so there only the data order varies between seeds.
    data_seeds: list[int] | None = None
    eval_every: int = Field(250, gt=0)
    eval_tokens: int = Field(20_971_520, gt=0)
    save_every: int = Field(1000, gt=0)
    # Optimiser and schedule, in nanochat's terms (learning rates are the d12 / 2**19-token
    # values before the trainer's batch-size scaling). None: the engine's own default (builtin:
    # nanochat 92d63d4's, armlab.train.recipe; nanochat engine: the flag is not passed).
    embedding_lr: float | None = Field(None, gt=0)
    unembedding_lr: float | None = Field(None, gt=0)
    matrix_lr: float | None = Field(None, gt=0)
    scalar_lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    warmup_steps: int | None = Field(None, ge=0)
    warmdown_ratio: float | None = Field(None, ge=0, le=1)
    final_lr_frac: float | None = Field(None, ge=0, le=1)
    compile: bool = True
    allow_repeat: bool = False
    wandb_project: str | None = None

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    @model_validator(mode="after")
    def _paired_data_seeds(self) -> TrainSpec:
        if self.data_seeds is not None:
            if len(self.data_seeds) != len(self.seeds):
                raise ValueError(
                    f"train.data_seeds has {len(self.data_seeds)} entries, train.seeds {len(self.seeds)}: they pair "
                    "by position (run k: init seed seeds[k], data order data_seeds[k]); give one per seed"
                )
            if len(set(self.data_seeds)) != len(self.data_seeds):
                raise ValueError(f"train.data_seeds must be distinct, got {self.data_seeds}")
        return self

    def data_seed(self, seed: int) -> int:
        """The data-order seed of the run with (init) seed `seed`: its partner in data_seeds, else itself."""
        if self.data_seeds is not None and seed in self.seeds:
            return self.data_seeds[self.seeds.index(seed)]
        return seed

    @model_validator(mode="after")
    def _one_horizon(self) -> TrainSpec:
        given = [
            k for k in ("target_param_data_ratio", "tokens", "num_iterations") if getattr(self, k) is not None
        ]
        if len(given) > 1:
            raise ValueError(
                f"train: set only one of target_param_data_ratio, tokens, num_iterations (got {', '.join(given)})"
            )
        return self

    @property
    def param_data_ratio(self) -> float:
        """The tokens-per-scaling-parameter ratio: the file's, else nanochat 92d63d4's default (12).

        nanochat derives the auto batch size and the weight-decay scaling from this ratio's
        horizon even when the run's length is given as a number of steps, and so does armlab.
        """
        if self.target_param_data_ratio is not None:
            return self.target_param_data_ratio
        return DEFAULT_PARAM_DATA_RATIO


# DCLM's CORE eval bundle, where nanochat's scripts/base_eval.py downloads it from (EVAL_BUNDLE_URL)
DCLM_EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


class NanochatSpec(Strict):
    """The researcher's own nanochat checkout, for `[train] engine = "nanochat"`."""

    path: str | None = None  # the checkout's root (`~` expanded); per host: [[hosts]] nanochat
    python: str | None = None  # default: <path>/.venv/bin/python, else the interpreter running armlab
    extra_args: list[str] = Field(default_factory=list)  # passed to scripts.base_train verbatim

    def comparable(self) -> dict[str, Any]:
        """What of this section changes the trained model: the extra flags (the path and python
        differ per host; the checkout's commit and diff are recorded per run by the engine)."""
        return {"extra_args": list(self.extra_args)}


class EvaluateSpec(Strict):
    # local dir or URL of a DCLM-format eval bundle; "none" (or "") turns CORE off: val bpb only
    core_bundle: str | None = DCLM_EVAL_BUNDLE_URL
    core_bundle_sha256: str | None = None
    max_per_task: int | None = Field(None, gt=0)
    # Noise measured from the run (Signal and Noise, Heineman et al. 2025): the final evaluation
    # scores each run's last k checkpoints; the built-in trainer saves them `last_k_every` steps
    # apart (None: 5% of the run). 1: the final checkpoint only (no noise estimate).
    last_k: int = Field(3, ge=1, le=50)
    last_k_every: int | None = Field(None, gt=0)
    # The headline figures (val bpb, CORE, per-item scores) as the mean over the last k evaluations
    # (Signal and Noise's checkpoint averaging); false: the final checkpoint's.
    average_last_k: bool = False
    # CORE tasks whose signal-to-noise ratio (spread between arms / checkpoint-to-checkpoint noise)
    # is below this are flagged, and an aggregate without them is shown. Two arms that differ only
    # by noise have an expected ratio of about 1.1 (|N(0, 2 s^2)| / s), so 2 flags most such tasks.
    min_snr: float = Field(2.0, ge=0)

    @field_validator("core_bundle")
    @classmethod
    def _off(cls, v: str | None) -> str:
        return "none" if v is None or v.strip().lower() in ("", "none") else v  # kept in the frozen file

    @property
    def bundle(self) -> str | None:
        """The bundle to score CORE on, None when CORE is off."""
        return None if self.core_bundle == "none" else self.core_bundle


class ReportSpec(Strict):
    """What the report shows about the arms' data."""

    group_column: str | None = None  # a categorical pool column (e.g. fineweb's `dump`): each arm's mix


class HostSpec(Strict):
    name: str
    ssh: str  # user@host, or a Host alias from ~/.ssh/config
    arms: list[str] = Field(min_length=1)  # every run (arm x seed) of these arms trains here (armlab.ops.schedule)
    num_gpus: int = Field(8, ge=0)
    gpus_per_run: int | None = Field(None, gt=0)  # cuda: GPUs of one run (default num_gpus: one run at a time)
    runs_at_once: int = Field(1, gt=0)  # cpu: runs side by side, each of `nproc` processes on its share of the cores
    master_port: int | None = Field(None, gt=0, lt=65536)  # None: each torchrun binds a free port; P: run k at once uses P + k
    workdir: str | None = None
    python: str | None = None
    port: int | None = Field(None, gt=0, lt=65536)  # ssh port, when not in ~/.ssh/config
    device: Literal["cuda", "cpu"] = "cuda"
    nproc: int = Field(1, gt=0)  # training processes per arm when device = "cpu" (num_gpus is for cuda)
    nanochat: str | None = None  # the nanochat checkout on this host (default: [nanochat] path)


class Experiment(Strict):
    name: str
    workdir: str | None = None
    pool: PoolSpec
    eval: EvalSpec = EvalSpec()
    tokenizer: TokenizerSpec = TokenizerSpec()
    shards: ShardSpec = ShardSpec()
    arms: list[ArmSpec] = Field(min_length=1)
    model: ModelSpec = ModelSpec()
    train: TrainSpec = TrainSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    report: ReportSpec = ReportSpec()
    nanochat: NanochatSpec = NanochatSpec()
    hosts: list[HostSpec] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"experiment name {v!r} must be letters, digits, '.', '_' or '-'")
        return v

    @model_validator(mode="after")
    def _cross_checks(self) -> Experiment:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate arm name(s): {', '.join(dup)}")
        hnames = [h.name for h in self.hosts]
        hdup = sorted({n for n in hnames if hnames.count(n) > 1})
        if hdup:
            raise ValueError(f"duplicate host name(s): {', '.join(hdup)}")
        for h in self.hosts:
            for a in h.arms:
                if a not in names:
                    raise ValueError(f"host {h.name!r} names unknown arm {a!r} (arms: {', '.join(names)})")
        return self

    # -- conveniences -----------------------------------------------------------------------
    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        names = [a.name for a in self.arms]
        hint = f"did you mean {m!r}? " if (m := closest(name, names)) else ""
        raise ArmlabError(f"no arm named {name!r} in experiment {self.name!r} ({hint}arms: {', '.join(names)})")

    @property
    def workdir_path(self) -> Path:
        raw = self.workdir or f"~/.cache/armlab/{self.name}"
        return Path(os.path.expandvars(raw)).expanduser()

    def comparability(self) -> dict[str, Any]:
        """Everything every arm must share (DESIGN.md invariant 1), as plain data.

        Excludes what legitimately differs between arms (the arm itself, its data) and what does
        not affect the result (hosts, wandb project, save cadence, compile). `train.engine` is
        included; an engine with its own section (named after it, e.g. `[nanochat]`) says which of
        its settings count through that section's `comparable()` (a checkout path differs per
        host, its extra flags do not). What only the engine can resolve at run time (a checkout's
        commit) is recorded per run (run.json "engine_comparable") and compared between runs.
        """
        train = self.train.model_dump(
            exclude={"seeds", "data_seeds", "wandb_project", "save_every", "compile", "allow_repeat"}
        )
        out = {
            "pool": self.pool.model_dump(),
            "eval": self.eval.model_dump(),
            "tokenizer": self.tokenizer.model_dump(),
            "model": self.model.model_dump(),
            "train": train,
        }
        section = getattr(self, self.train.engine, None)  # the engine's own spec section, if it has one
        if section is not None:
            out["engine"] = section.comparable()
        return out

    def fingerprint(self) -> str:
        return fingerprint(self.comparability())


def fingerprint(obj: Any) -> str:
    """Stable sha256 (hex, 16 chars) of canonical JSON: same data, same fingerprint, any version."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fingerprint_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for `compare`'s refusal)."""
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(fingerprint_diff(va, vb, key + "."))
        elif va != vb:
            out.append(key)
    return out


def _loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts[-1:] = [f"{parts[-1]}[{p}]"] if parts else [f"[{p}]"]
        else:
            parts.append(str(p))
    return ".".join(parts)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation: `ArmSpec`, `list[ArmSpec]`, `X | None` -> X."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for a in get_args(annotation) if (m := _model_in(a)) is not None), None)


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    """The keys the spec allows at `loc` (e.g. ("arms", 0) -> ArmSpec's fields), for "did you mean"."""
    model: type[BaseModel] | None = Experiment
    for part in loc:
        if isinstance(part, int):
            continue  # an index into a list of tables: the same model
        field = model.model_fields.get(part) if model else None
        model = _model_in(field.annotation) if field else None
    return list(model.model_fields) if model else []


def _error_line(source: str, err: ValidationError) -> str:
    # A typo'd key is also a missing one (`[pol]` -> pool missing): name the typo, it is the cause.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errors[0]
    loc = tuple(p for p in e["loc"] if p not in ("function-after",))
    where = _loc(loc)
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        match = closest(str(loc[-1]), _keys_at(loc[:-1]))
        hint = f"did you mean {match!r}?" if match else "check its spelling"
        line = f"{source}: unknown key '{where}': {hint} (every key is in examples/fineweb-edu-top-vs-random.toml and docs/DESIGN.md)"
    elif e["type"] == "missing":
        line = f"{source}: missing required key '{where}'"
    elif where:
        line = (
            f"{source}: {where}: {msg} (got {e.get('input')!r})"
            if e["type"].endswith(("_type", "_parsing"))
            else f"{source}: {where}: {msg}"
        )
    else:
        line = f"{source}: {msg}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return line


# Command-line overrides, for every command (`train --depth`, `prepare --ratio`, ...): one place.
MODEL_KEYS = set(ModelSpec.model_fields)
TRAIN_KEYS = set(TrainSpec.model_fields) - {"seeds", "data_seeds"}
HORIZONS = ("num_iterations", "tokens", "target_param_data_ratio")


def with_overrides(exp: Experiment, overrides: Mapping[str, Any]) -> Experiment:
    """The experiment with command-line overrides (None = not given), validated as a spec.

    A plain key is a [model] / [train] field; `section.field` reaches any other section and
    `arms.NAME.field` one arm. Any one of `num_iterations`, `tokens`, `target_param_data_ratio`
    replaces the file's horizon. Overrides change the fingerprint, so runs with and without them
    never compare by accident. Pure: nothing is written (the frozen spec is the workdir's business).
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return exp
    data = exp.model_dump(mode="json")
    unknown = [
        k for k in given
        if ("." not in k and k not in MODEL_KEYS | TRAIN_KEYS)
        or ("." in k and k.split(".", 1)[0] not in Experiment.model_fields)
    ]  # fmt: skip
    if unknown:
        raise ArmlabError(
            f"unknown override{'s' if len(unknown) > 1 else ''} {', '.join(sorted(unknown))}; allowed: "
            f"{', '.join(sorted(MODEL_KEYS | TRAIN_KEYS))}, SECTION.FIELD or arms.NAME.FIELD"
        )
    if set(given) & set(HORIZONS):
        data["train"].update(dict.fromkeys(HORIZONS))
    for key, v in given.items():
        if key.startswith("arms."):
            name, _, fld = key.removeprefix("arms.").rpartition(".")
            exp.arm(name)  # unknown arm: the standard error naming the arms
            next(a for a in data["arms"] if a["name"] == name)[fld] = v
            continue
        section, _, name = key.rpartition(".")
        section = section or ("model" if key in MODEL_KEYS else "train")
        data[section] = {**(data.get(section) or {}), name: v}
    return parse_experiment(data, "command-line overrides")


def parse_experiment(data: dict[str, Any], source: str = "<experiment>") -> Experiment:
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise ArmlabError(_error_line(source, err)) from None


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every problem is one ArmlabError line naming the key."""
    p = Path(path)
    if p.is_dir() and (p / "experiment.toml").is_file():
        p = p / "experiment.toml"  # a workdir holds the frozen copy of its spec
    elif p.is_dir():
        raise ArmlabError(
            f"{p}: a directory without experiment.toml; pass the experiment file (or its workdir)"
        )
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ArmlabError(f"{p}: experiment file not found") from None
    except OSError as e:
        raise ArmlabError(f"{p}: cannot read experiment file ({e.strerror})") from None
    if b"\r\n" in raw:
        raw = raw.replace(b"\r\n", b"\n")  # files edited on Windows are fine; CRLF is not an error here
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArmlabError(f"{p}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ArmlabError(f"{p}: invalid TOML: {e}") from None
    return parse_experiment(data, str(p))
