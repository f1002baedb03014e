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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from armlab.errors import ArmlabError
from armlab.names import check_name
from armlab.store.redact import redact
from armlab.text import closest
from armlab.vocab import MIN_VOCAB_SIZE
from armlab.workdir import run_name

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

    @field_serializer("uri")
    def _uri_without_secrets(self, uri: str) -> str:
        return redact(uri)  # every copy armlab writes, and every fingerprint; requests read `.uri`


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
    score: str | None = None  # a `[[scorers]]` name: select on its scores (`armlab score`) instead of a column
    temperature: float = Field(1.0, gt=0)
    by: Literal["rows", "tokens"] = "rows"
    max_rows: int | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, gt=0)
    # prebuilt arms
    uri: str | None = None
    download_mode: Literal["bulk", "sequential"] = "bulk"
    concurrency: int = Field(8, gt=0)

    @field_serializer("uri")
    def _uri_without_secrets(self, uri: str | None) -> str | None:
        return None if uri is None else redact(uri)  # as PoolSpec's

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        check_name(v, "arm name")
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
            if self.ratio is not None or self.score_column is not None or self.score is not None:
                raise ValueError(f"arm {self.name!r}: kind 'prebuilt' takes no ratio, score_column or score")
        else:
            if self.ratio is None:
                raise ValueError(f"arm {self.name!r}: kind {self.kind!r} needs ratio")
            if self.uri is not None:
                raise ValueError(f"arm {self.name!r}: uri is only for kind 'prebuilt'")
        if self.kind in ("top", "sample") and not (self.score_column or self.score):
            raise ValueError(
                f"arm {self.name!r}: kind {self.kind!r} needs score_column (a pool column) or score (a scorer's name)"
            )
        if self.score_column and self.score:
            raise ValueError(f"arm {self.name!r}: set score_column or score, not both")
        if self.kind == "random" and (self.score_column or self.score):
            raise ValueError(f"arm {self.name!r}: kind 'random' takes no score_column or score")
        return self


ScorerKind = Literal["fasttext", "hf", "head"]


class ScorerSpec(Strict):
    """A model that scores every pool document (`armlab score`); arms select on it by `score = name`.

    fasttext: `model` = a .bin path or http(s) URL, `label` whose probability is the score (DCLM:
    "__label__hq"). hf: `model` = a hub id (with `revision`) or a local dir holding a sequence
    classifier saved with `save_pretrained`; the score is its regression output (one logit) or the
    softmax probability of `label`. head: `model` = a .safetensors / .npz file (path or URL) of a
    linear layer or an MLP over the pool's embedding `column`.
    """

    name: str
    kind: ScorerKind
    model: str
    label: str | None = None
    revision: str | None = None  # hf hub: a branch, tag or commit (a commit pins the scores)
    max_length: int = Field(512, gt=0)  # hf: tokens read of each document (the rest is truncated)
    batch_size: int = Field(64, gt=0)  # hf: documents per forward pass, batched by length
    column: str | None = None  # head: the pool's embedding column (a list of floats per document)
    activation: Literal["relu", "gelu", "tanh"] = "relu"  # head: between an MLP's layers

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v, "scorer name")  # the name is a directory of the scores dir

    @model_validator(mode="after")
    def _kind_fields(self) -> ScorerSpec:
        where = f"scorer {self.name!r}"
        if self.kind == "fasttext" and not self.label:
            raise ValueError(f"{where}: kind 'fasttext' needs label (e.g. \"__label__hq\", DCLM's classifier)")
        if self.kind == "head" and not self.column:
            raise ValueError(f"{where}: kind 'head' needs column (the pool's embedding column)")
        if self.kind != "head" and self.column:
            raise ValueError(f"{where}: column is only for kind 'head' (the others read pool.text_column)")
        if self.kind != "hf" and self.revision:
            raise ValueError(f"{where}: revision is only for kind 'hf' (a hub model)")
        return self

    def settings(self) -> dict[str, Any]:
        """The fields that apply to this kind of scorer, as manifests record it."""
        keep = {
            "fasttext": ("kind", "model", "label"),
            "hf": ("kind", "model", "revision", "label", "max_length", "batch_size"),
            "head": ("kind", "model", "column", "label", "activation"),
        }[self.kind]
        return {k: v for k, v in self.model_dump(include=set(keep)).items() if v is not None}


class ScoreSpec(Strict):
    """Where `armlab score` keeps the scores (the `[score]` table; `[[scorers]]` lists the models)."""

    # One dir of scores can serve every experiment over the same pool; default <workdir>/scores
    scores_dir: str | None = None


# Upper bounds of the recipe's numbers: far beyond any sane run, so a value past one is a typo or
# a unit mistake (e.g. `num_iterations = 10**30`, `matrix_lr = inf`), refused before anything runs.
MAX_STEPS = 10**9
MAX_TOKENS = 10**16
MAX_LR = 10.0  # nanochat's largest default is 0.5 (scalar_lr)


class ModelSpec(Strict):
    depth: int = Field(20, gt=0, le=1024)
    max_seq_len: int = Field(2048, gt=0, le=1 << 20)
    aspect_ratio: int = Field(64, gt=0, le=4096)  # model_dim = depth * aspect_ratio, rounded up to head_dim
    head_dim: int = Field(128, gt=0, le=4096)
    # Sliding-window attention, tiled over the layers (the last layer is always L): L = full
    # context, S = a quarter of it. None: the engine's default (nanochat 92d63d4: "SSSL").
    window_pattern: str | None = None

    @field_validator("window_pattern")
    @classmethod
    def _pattern_ok(cls, v: str | None) -> str | None:
        if v is not None and (not v or set(v.upper()) - {"S", "L"}):
            raise ValueError(f"must be a non-empty string of S (short window) and L (full context), got {v!r}")
        return v.upper() if v is not None else None


def _rate(upper: float) -> Any:
    """A recipe number: None (the engine's default) or finite in (0, upper]."""
    return Field(None, gt=0, le=upper, allow_inf_nan=False)


class TrainSpec(Strict):
    # What trains the model (armlab.train.engines): armlab's own trainer, or the researcher's
    # nanochat checkout ([nanochat]). Part of the fingerprint: runs of two engines never compare.
    engine: Literal["builtin", "nanochat"] = "builtin"
    device_batch_size: int = Field(32, gt=0, le=1 << 16)
    total_batch_size: int | None = Field(None, gt=0, le=1 << 40)  # None: nanochat's auto batch size
    target_param_data_ratio: float | None = _rate(10_000.0)  # default 12 when nothing else set
    tokens: int | None = Field(None, gt=0, le=MAX_TOKENS)
    num_iterations: int | None = Field(None, gt=0, le=MAX_STEPS)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    # Data-order seeds, paired with `seeds` by position: run k initialises from seeds[k] and reads
    # its arm in the order of data_seeds[k]. None: each seed is both (the default). The nanochat
    # engine has a fixed init seed, so there only the data order varies between seeds.
    data_seeds: list[int] | None = None
    eval_every: int = Field(250, gt=0, le=MAX_STEPS)
    eval_tokens: int = Field(20_971_520, gt=0, le=MAX_TOKENS)
    save_every: int = Field(1000, gt=0, le=MAX_STEPS)
    # Optimiser and schedule, in nanochat's terms (learning rates are the d12 / 2**19-token
    # values before the trainer's batch-size scaling). None: the engine's own default (builtin:
    # nanochat 92d63d4's, armlab.train.recipe; nanochat engine: the flag is not passed). Finite
    # and bounded: a diverging run is stopped (state "diverged"), a nonsensical one never starts.
    embedding_lr: float | None = _rate(MAX_LR)
    unembedding_lr: float | None = _rate(MAX_LR)
    matrix_lr: float | None = _rate(MAX_LR)
    scalar_lr: float | None = _rate(MAX_LR)
    weight_decay: float | None = Field(None, ge=0, le=MAX_LR, allow_inf_nan=False)
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    warmdown_ratio: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    final_lr_frac: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
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
    last_k_every: int | None = Field(None, gt=0, le=MAX_STEPS)
    # The headline figures (val bpb, CORE, per-item scores) as the mean over the last k evaluations
    # (Signal and Noise's checkpoint averaging); false: the final checkpoint's.
    average_last_k: bool = False
    # CORE tasks whose signal-to-noise ratio (spread between arms / checkpoint-to-checkpoint noise)
    # is below this are flagged, and an aggregate without them is shown. Two arms that differ only
    # by noise have an expected ratio of about 1.1 (|N(0, 2 s^2)| / s), so 2 flags most such tasks.
    min_snr: float = Field(2.0, ge=0, allow_inf_nan=False)

    @field_validator("core_bundle")
    @classmethod
    def _off(cls, v: str | None) -> str:
        return "none" if v is None or v.strip().lower() in ("", "none") else v  # kept in the frozen file

    @property
    def bundle(self) -> str | None:
        """The bundle to score CORE on, None when CORE is off."""
        return None if self.core_bundle == "none" else self.core_bundle


class ReportSpec(Strict):
    """What the report shows about the arms' data, and how it splits the eval set."""

    # A pool column that groups documents: categorical (e.g. fineweb's `dump`, a `source`): each
    # arm's mix, and val bpb per value of it on the eval set; numeric with `group_bins`: val bpb
    # per quantile bin of it (e.g. the quality score) on the eval set.
    group_column: str | None = None
    group_bins: int | None = Field(None, ge=2, le=20)  # quantile bins of a numeric group_column
    max_groups: int = Field(8, ge=2, le=50)  # groups shown, the largest first; the rest pooled as "other"

    @model_validator(mode="after")
    def _bins_need_a_column(self) -> ReportSpec:
        if self.group_bins is not None and not self.group_column:
            raise ValueError("report.group_bins needs report.group_column (the numeric column to bin)")
        return self

    def group_label(self, scorers: list[str] | tuple[str, ...] = ()) -> str | None:
        """The eval shards' column that labels each document's group (data/prepare/targets.py):
        `group:<column>` (a category), `score:<column>` (a numeric pool column, binned) or
        `scorer:<name>` (binned scores of a [[scorers]] entry among `scorers`)."""
        if not self.group_column:
            return None
        if self.group_bins and self.group_column in scorers:
            return f"scorer:{self.group_column}"
        return f"{'score' if self.group_bins else 'group'}:{self.group_column}"


class LadderSpec(Strict):
    """The same arms at several depths (DataDecide's scale ladder, on the user's own data): does the
    ranking hold from the small models to the depth the experiment is about (`model.depth`)?"""

    depths: list[int] = Field(default_factory=list)  # e.g. [4, 6, 8]; each trains ratio x its params

    @field_validator("depths")
    @classmethod
    def _depths_ok(cls, v: list[int]) -> list[int]:
        if v and (len(set(v)) != len(v) or min(v) < 1):
            raise ValueError(f"depths must be distinct positive integers, got {v}")
        if len(v) == 1:
            raise ValueError(f"a ladder needs two or more depths, got {v}")
        return sorted(v)


ExecutorKind = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorKind)


class PrepareSpec(Strict):
    """Where `armlab prepare` (and `armlab score`) run their units of work (the `[prepare]` table)."""

    executor: ExecutorKind = "local"  # local: this machine's processes; ray: a Ray cluster's nodes
    # ray: the head's GCS host:port, or "auto" (a cluster started on this machine); default RAY_ADDRESS, else auto
    ray_address: str | None = None
    workers: int | None = Field(None, gt=0)  # units at once (local: default the CPU count; ray: the cluster's CPUs)


WALLTIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def walltime_seconds(value: str) -> int:
    """Slurm's time formats (sbatch --time): minutes, minutes:seconds, hours:minutes:seconds,
    days-hours, days-hours:minutes, days-hours:minutes:seconds -> seconds."""
    m = WALLTIME_RE.match(value.strip())
    if not m:
        raise ValueError(
            f"time {value!r} is not a Slurm walltime (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
        )
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    if b is not None:  # MM:SS
        return a * 60 + b
    return a * 60  # minutes


SLURM_KEYS = ("partition", "prepare_partition", "account", "qos", "time", "gpus_per_node", "cpus_per_task",
              "extra_sbatch")  # fmt: skip


class HostSpec(Strict):
    """A `[[hosts]]` entry: where the runs of some arms train (armlab.ops.hosts: one backend per
    `scheduler`)."""

    name: str
    scheduler: Literal["ssh", "slurm"] = "ssh"
    # ssh: user@host or a Host alias from ~/.ssh/config. slurm: the login node to reach over SSH;
    # unset, armlab runs on the login node itself.
    ssh: str | None = None
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
    # several machines per run: ssh lists them (`nodes`, the first is node 0); slurm asks for them
    nodes: list[str] | None = Field(None, min_length=2)  # ssh: every run spans these machines
    nodes_per_run: int | None = Field(None, gt=0)  # default: len(nodes) (ssh), 1 (slurm)
    # slurm
    partition: str | None = None  # where the runs' jobs go
    prepare_partition: str | None = None  # prepare as a CPU job there (unset: on the login node)
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # walltime of one job; a longer run continues as a chain of jobs
    gpus_per_node: int | None = Field(None, ge=0)  # cuda: GPUs of each node of a run (default num_gpus)
    cpus_per_task: int | None = Field(None, gt=0)
    extra_sbatch: list[str] = Field(default_factory=list)  # verbatim `#SBATCH ...` lines

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v, "host name")

    @field_validator("time")
    @classmethod
    def _time_ok(cls, v: str | None) -> str | None:
        if v is not None:
            walltime_seconds(v)
        return v

    @field_validator("extra_sbatch")
    @classmethod
    def _sbatch_lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if not line.startswith("#SBATCH ") or "\n" in line:
                raise ValueError(f"extra_sbatch line {line!r} must be one line starting '#SBATCH '")
        return v

    @model_validator(mode="after")
    def _scheduler_keys(self) -> HostSpec:
        where = f"host {self.name!r}"
        if self.scheduler == "ssh":
            if self.ssh is None and not self.nodes:
                raise ValueError(f'{where}: set ssh (user@host or an alias), or nodes = ["user@a", "user@b"]')
            if self.ssh is not None and self.nodes:
                raise ValueError(f"{where}: set ssh or nodes, not both (nodes lists every machine, node 0 first)")
            slurm_only = [k for k in SLURM_KEYS if getattr(self, k) not in (None, [])]
            if slurm_only:
                raise ValueError(f'{where}: {", ".join(slurm_only)} need scheduler = "slurm"')
            if self.nodes and self.nodes_per_run not in (None, len(self.nodes)):
                raise ValueError(
                    f"{where}: nodes_per_run = {self.nodes_per_run} but nodes lists {len(self.nodes)}; every run "
                    "spans the listed nodes: list exactly nodes_per_run of them (another entry for the rest)"
                )
            if self.nodes and self.master_port is None:
                raise ValueError(
                    f"{where}: a run across nodes meets at node 0's master_port (lane k at master_port + k): set "
                    "master_port to a port free on node 0"
                )
            if not self.nodes and (self.nodes_per_run or 1) > 1:
                raise ValueError(f'{where}: nodes_per_run > 1 needs nodes = ["user@a", "user@b", ...]')
        else:
            if self.nodes:
                raise ValueError(f"{where}: nodes is for ssh entries; a Slurm entry asks for nodes_per_run")
            if not self.partition:
                raise ValueError(f"{where}: a Slurm entry needs partition (`sinfo -s` lists them)")
            if self.master_port is not None:
                raise ValueError(f"{where}: master_port is for ssh entries; a Slurm job picks its port from its job id")
            if self.runs_at_once > 1 or self.gpus_per_run is not None:
                raise ValueError(
                    f"{where}: runs_at_once and gpus_per_run are for ssh entries; on Slurm each run is a job "
                    "(nodes_per_run x gpus_per_node)"
                )
        return self

    @property
    def target(self) -> str | None:
        """The SSH target of node 0 (None: a Slurm login node armlab runs on)."""
        return self.nodes[0] if self.nodes else self.ssh

    @property
    def nodes_of_run(self) -> int:
        return self.nodes_per_run or (len(self.nodes) if self.nodes else 1)

    def ranks_per_node(self, device: str | None = None) -> int:
        """Ranks on each node of a run (`device` overrides the entry's): nproc on CPU; GPUs
        (gpus_per_node on Slurm, else gpus_per_run, else num_gpus) on CUDA."""
        if (device or self.device) == "cpu":
            return self.nproc
        if self.scheduler == "slurm":
            return self.gpus_per_node if self.gpus_per_node is not None else self.num_gpus
        return self.gpus_per_run or self.num_gpus

    @property
    def walltime_s(self) -> int | None:
        return None if self.time is None else walltime_seconds(self.time)


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
    ladder: LadderSpec = LadderSpec()
    prepare: PrepareSpec = PrepareSpec()
    nanochat: NanochatSpec = NanochatSpec()
    hosts: list[HostSpec] = Field(default_factory=list)
    scorers: list[ScorerSpec] = Field(default_factory=list)
    score: ScoreSpec = ScoreSpec()

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        return check_name(v, "experiment name")

    @model_validator(mode="after")
    def _cross_checks(self) -> Experiment:
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate arm name(s): {', '.join(dup)}")
        snames = [s.name for s in self.scorers]
        sdup = sorted({n for n in snames if snames.count(n) > 1})
        if sdup:
            raise ValueError(f"duplicate scorer name(s): {', '.join(sdup)}")
        for a in self.arms:
            if a.score and a.score not in snames:
                known = f"scorers: {', '.join(snames)}" if snames else "add a [[scorers]] table"
                raise ValueError(f"arm {a.name!r}: score {a.score!r} names no scorer ({known})")
        hnames = [h.name for h in self.hosts]
        hdup = sorted({n for n in hnames if hnames.count(n) > 1})
        if hdup:
            raise ValueError(f"duplicate host name(s): {', '.join(hdup)}")
        for h in self.hosts:
            for a in h.arms:
                if a not in names:
                    raise ValueError(f"host {h.name!r} names unknown arm {a!r} (arms: {', '.join(names)})")
        if self.ladder.depths:
            if self.model.depth not in self.ladder.depths:
                raise ValueError(
                    f"ladder.depths {self.ladder.depths} must include model.depth ({self.model.depth}): the depth "
                    "the verdict is about, the ladder's top rung"
                )
            fixed = [k for k in ("tokens", "num_iterations") if getattr(self.train, k) is not None]
            if fixed:
                raise ValueError(
                    f"a [ladder] trains each depth for target_param_data_ratio x its parameters; remove train.{fixed[0]} "
                    "(a fixed horizon would give the small depths far more tokens per parameter than the large)"
                )
        return self

    # -- conveniences -----------------------------------------------------------------------
    def arm(self, name: str) -> ArmSpec:
        for a in self.arms:
            if a.name == name:
                return a
        names = [a.name for a in self.arms]
        hint = f"did you mean {m!r}? " if (m := closest(name, names)) else ""
        raise ArmlabError(f"no arm named {name!r} in experiment {self.name!r} ({hint}arms: {', '.join(names)})")

    def run_name(self, arm: str, seed: int) -> str:
        """A run's name: `arm-sS`; in a ladder `arm-dD-sS`, so the rungs' runs never collide."""
        return run_name(arm, seed, self.model.depth if self.ladder.depths else None)

    def at_depth(self, depth: int) -> Experiment:
        """The ladder rung at `depth`: the same experiment with `model.depth = depth` (its horizon
        follows from the ratio; its fingerprint differs, so each rung compares only with itself)."""
        return self.model_copy(update={"model": self.model.model_copy(update={"depth": depth})})

    def rungs(self) -> list[Experiment]:
        """Every rung of the ladder, smallest first; [self] without a ladder."""
        return [self.at_depth(d) for d in self.ladder.depths] if self.ladder.depths else [self]
    def scorer(self, name: str) -> ScorerSpec:
        for s in self.scorers:
            if s.name == name:
                return s
        names = [s.name for s in self.scorers]
        if not names:
            raise ArmlabError(f"experiment {self.name!r} has no [[scorers]]; add one to score the pool with a model")
        hint = f"did you mean {m!r}? " if (m := closest(name, names)) else ""
        raise ArmlabError(f"no scorer named {name!r} in experiment {self.name!r} ({hint}scorers: {', '.join(names)})")

    @property
    def scores_path(self) -> Path:
        """Where the scorers' sidecars live: `[score] scores_dir`, else <workdir>/scores."""
        if self.score.scores_dir:
            return Path(os.path.expandvars(self.score.scores_dir)).expanduser()
        return self.workdir_path / "scores"

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
