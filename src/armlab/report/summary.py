"""The report's summary as one typed record: what `compare` computes, `render`/`plots` show, and
`summary.json` holds.

`Summary.to_json()` is strict JSON: a value that is not a finite number (which compare refuses
before it gets here) is written as null, never as a bare NaN/Infinity that JSON readers reject.
`Summary.from_json()` reads it back (a report can be re-rendered, a pilot's noise re-read).
Intervals are `intervals.Interval` (a dataclass), written with their derived fields (half width,
weak) for readers of the file.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from armlab.report.intervals import Interval

IntervalField = Annotated[
    Interval,
    BeforeValidator(Interval.from_json),
    PlainSerializer(lambda iv: iv.as_dict(), return_type=dict),
]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="null")


class RunResult(Record):
    """One finished run's final values (`complete.final_values`)."""

    run: str
    seed: int
    val_bpb: float | None
    core: float | None
    tokens: int | None
    epoch: float | None
    train_time_s: float | None
    step: int


class EvalCoverage(Record):
    """What an arm's final evaluation covered (the same for every run: compare refuses otherwise)."""

    val_bpb_tokens: int | None = None
    val_bpb_docs: int | None = None
    eval_tokens_cap: int | None = None  # eval.json max_tokens: None = the whole eval set
    core_items: dict[str, int | None] = Field(default_factory=dict)


class ArmResult(Record):
    kind: str
    runs: list[RunResult]
    planned_seeds: list[int]  # train.seeds plus any seeds `run --until-decided` added
    curves: dict[str, list[tuple[float, float]]]  # run -> [(tokens, val bpb)] from training
    val_bpb: IntervalField | None
    core: IntervalField | None
    core_tasks: dict[str, IntervalField] = Field(default_factory=dict)
    tokens: float | None = None  # means over the runs
    epoch: float | None = None
    train_time_s: float | None = None
    eval: EvalCoverage = EvalCoverage()
    missing_items: dict[str, str] = Field(default_factory=dict)  # metric -> why no per-item data

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def interval(self, metric: str) -> Interval | None:
        return getattr(self, metric)


class Detectable(Record):
    """The smallest true difference the design detects (95% two-sided, 80% power), at the observed
    seed noise and at both ends of that noise's own 95% interval (a few seeds pin it down poorly)."""

    value: float
    low: float | None = None
    high: float | None = None


class Comparison(Record):
    """One metric's difference arm - reference."""

    arm: str
    reference: str
    metric: str
    interval: IntervalField
    detectable: Detectable | None = None
    seed_var_per_seed: float | None = None  # one seed's difference variance (for planning)


class GroupResult(Record):
    """Val bpb of one group of eval documents (a value of `report.group_column`, or a bin)."""

    label: str
    docs: int
    byte_share: float  # of the scored eval bytes
    arms: dict[str, IntervalField]
    differences: dict[str, IntervalField]  # arm -> arm - reference


class Groups(Record):
    """Per-group val bpb: each interval at `level` (Bonferroni over the groups, so that every
    group's claim holds at once at 95%)."""

    column: str
    binned: bool  # quantile bins of a numeric column
    level: float
    groups: list[GroupResult]
    verdict: list[str]


class Rung(Record):
    """One depth of a ladder: what a run there costs, and its comparison (`report/ladder.py`)."""

    depth: int
    params: int  # scaling parameters (the horizon is ratio x these)
    tokens: int  # per run
    flops: float  # per run
    arms: dict[str, dict[str, IntervalField]] = Field(default_factory=dict)  # metric -> arm -> interval
    differences: dict[str, dict[str, IntervalField]] = Field(default_factory=dict)  # metric -> arm -> arm - ref
    seeds: dict[str, int] = Field(default_factory=dict)  # finished seeds per arm
    missing: str | None = None  # why this depth has no comparison (yet)


class Ladder(Record):
    reference: str
    target: int  # model.depth: the depth the experiment's verdict is about
    rungs: list[Rung]
    verdict: list[str]


class ExcludedRun(Record):
    run: str
    arm: str
    state: str
    dir: str


class Summary(Record):
    experiment: str
    fingerprint: str
    created: float
    reference_arm: str
    arms: dict[str, ArmResult]
    comparisons: list[Comparison]
    verdict: list[str]
    warnings: list[str]
    bundle: dict[str, Any] | None
    resamples: int
    bootstrap_seed: int
    train_eval_tokens: int
    excluded: list[ExcludedRun]
    groups: Groups | None = None
    groups_missing: str | None = None  # why there are no per-group results although asked for
    data: dict[str, Any] | None = None  # datadiff.data_difference
    notes: list[str] = Field(default_factory=list)
    decided: list[str] = Field(default_factory=list)  # each round of `run --until-decided`, as it said
    ladder: Ladder | None = None
    # continuous CORE beside accuracy and each task's signal-to-noise (report.continuous), plain data
    continuous: dict[str, Any] | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> Summary:
        return cls.model_validate_json(text)

    def comparison(self, arm: str, metric: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.arm == arm and c.metric == metric), None)

    def with_(self, **fields: Any) -> Summary:
        """A copy with `fields` replaced (the record is frozen)."""
        return self.model_copy(update=fields)
