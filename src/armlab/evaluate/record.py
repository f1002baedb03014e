"""eval.json as typed records: what one evaluation of a run measured, and of what.

An `EvalResult` says what it evaluated (the run, the checkpoint's step and a content hash of its
weights, the eval set's fingerprint, the bpb method, the CORE bundle) next to what it measured, so
`compare` can check that an eval.json belongs to the run it sits in and that every run's numbers
are the same kind of measurement (issue 20: a copied eval.json was accepted, and a missing one was
silently replaced by a 4,096-token in-training number).

    val bpb      `bpb`: whole documents (every byte of the eval set, `evaluate.bpb`), per-document
                 sums for the intervals; `packed`: nanochat's packed val stream, a second labelled
                 number (it crops documents: its `coverage` says how much of the set it scores)
    CORE         `core`: per task accuracy-CORE and the continuous scores (per item: log-prob of
                 the correct continuation and its bytes; margin over the best wrong option)
    last k       `checkpoints`: the scores of each of the run's last k checkpoints (the noise
                 of Signal and Noise, Heineman et al. 2025); with `averaged > 1` the headline
                 figures are their mean

Older eval.json files (armlab 0.2) parse too (`from_json` fills what they lack with None), so
compare can name them and ask for `armlab evaluate --force` instead of failing on a key.
The module is torch-free: `compare` reads eval.json without torch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

VERSION = 2
WHOLE_DOCS = "whole_docs"  # every document scored whole (long ones in sliding windows)
PACKED = "packed"  # nanochat's BOS-aligned best-fit val stream (crops documents)


@dataclass(frozen=True)
class BpbMethod:
    """How val bpb was measured: the kind, the context, and (whole docs) the least context a token
    of a long document is scored with."""

    kind: str  # WHOLE_DOCS | PACKED
    context: int  # the model's sequence length
    min_context: int | None = None  # WHOLE_DOCS: tokens of its own document every scored token sees

    def describe(self) -> str:
        if self.kind == PACKED:
            return f"nanochat's packed val stream (rows of {self.context} tokens; crops documents)"
        return (
            f"whole documents (longer than {self.context} tokens: sliding windows, each token scored once "
            f"with >= {self.min_context} tokens of its document as context)"
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> BpbMethod | None:
        return None if not d else cls(str(d["kind"]), int(d["context"]), d.get("min_context"))


@dataclass(frozen=True)
class BpbResult:
    """Val bits per byte: nats / (ln 2 * bytes) over the scored target tokens (specials excluded)."""

    method: BpbMethod
    bpb: float
    tokens: int  # target tokens scored (those with bytes)
    docs: int  # documents with at least one scored token
    bytes: int  # UTF-8 bytes scored
    eval_bytes: int  # UTF-8 bytes of the whole eval set
    per_doc_nats: list[float] | None = None  # eval-set document order (0 where not scored)
    per_doc_bytes: list[int] | None = None

    @property
    def coverage(self) -> float:
        """Share of the eval set's bytes that were scored."""
        return self.bytes / self.eval_bytes if self.eval_bytes else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("per_doc_nats", "per_doc_bytes")
        }
        out["method"] = self.method.to_json()
        out["coverage"] = self.coverage
        if self.per_doc_nats is not None:
            out["per_doc"] = {"nats": self.per_doc_nats, "bytes": self.per_doc_bytes}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> BpbResult | None:
        if not d:
            return None
        per_doc = d.get("per_doc") or {}
        return cls(
            method=BpbMethod.from_json(d["method"]),  # type: ignore[arg-type]
            bpb=float(d["bpb"]),
            tokens=int(d["tokens"]),
            docs=int(d["docs"]),
            bytes=int(d["bytes"]),
            eval_bytes=int(d["eval_bytes"]),
            per_doc_nats=per_doc.get("nats"),
            per_doc_bytes=per_doc.get("bytes"),
        )


@dataclass(frozen=True)
class TaskResult:
    """One CORE task: accuracy as nanochat's core_eval scores it, and the continuous scores.

    Per item, in the task's fixed item order: `correct` (0/1; a mean over checkpoints when averaged),
    `logprob` (nats of the correct continuation: its tokens' log-probabilities summed), `bytes` (its
    UTF-8 bytes) and, for multiple-choice and schema tasks, `margin` (bits per byte of the correct
    option minus those of the best wrong one: > 0 when the model prefers the right answer)."""

    label: str
    type: str
    n: int
    num_fewshot: int
    random_baseline: float  # percent
    accuracy: float
    centered: float
    correct: list[float] | None = None
    logprob: list[float] | None = None
    bytes: list[int] | None = None
    margin: list[float] | None = None

    @property
    def logprob_per_byte(self) -> float | None:
        """Bits per byte of the correct continuations, pooled over items (<= 0; higher is better)."""
        if not self.logprob or not self.bytes:
            return None
        return sum(self.logprob) / (math.log(2) * sum(self.bytes))

    @property
    def mean_margin(self) -> float | None:
        return None if not self.margin else sum(self.margin) / len(self.margin)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["logprob_per_byte"] = self.logprob_per_byte
        out["mean_margin"] = self.mean_margin
        return out

    @classmethod
    def from_json(cls, label: str, d: Mapping[str, Any]) -> TaskResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{"label": label, **{k: v for k, v in d.items() if k in names and k != "label"}})


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class CoreResult:
    """Every task of a CORE bundle: CORE (mean centred accuracy) and its continuous companions."""

    tasks: dict[str, TaskResult]
    bundle: dict[str, Any]  # armlab.evaluate.bundle.Bundle.describe()
    max_per_task: int | None = None

    @property
    def core(self) -> float:
        return sum(t.centered for t in self.tasks.values()) / len(self.tasks)

    @property
    def core_lp(self) -> float | None:
        """Continuous CORE: the mean over tasks of the correct continuations' log-prob (bits per byte)."""
        return _mean([t.logprob_per_byte for t in self.tasks.values()])

    @property
    def core_margin(self) -> float | None:
        """The mean over multiple-choice and schema tasks of the mean per-item margin (bits per byte)."""
        return _mean([t.mean_margin for t in self.tasks.values()])

    def to_json(self) -> dict[str, Any]:
        return {
            "core": self.core,
            "core_lp": self.core_lp,
            "core_margin": self.core_margin,
            "max_per_task": self.max_per_task,
            "bundle": self.bundle,
            "tasks": {label: t.to_json() for label, t in self.tasks.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> CoreResult | None:
        if not d or not d.get("tasks"):
            return None
        return cls(
            tasks={label: TaskResult.from_json(label, t) for label, t in d["tasks"].items()},
            bundle=dict(d.get("bundle") or {}),
            max_per_task=d.get("max_per_task"),
        )


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint by step and by content: the sha256 of its weight files."""

    step: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> CheckpointRef | None:
        return None if not d else cls(int(d["step"]), str(d["sha256"]))


@dataclass(frozen=True)
class EvalSetRef:
    """The eval set an evaluation scored: its content fingerprint, documents and bytes."""

    fingerprint: str
    docs: int
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> EvalSetRef | None:
        return None if not d else cls(str(d["fingerprint"]), int(d["docs"]), int(d["bytes"]))


@dataclass(frozen=True)
class CheckpointScores:
    """What one of the run's last k checkpoints scored (no per-item data: the noise needs none)."""

    checkpoint: CheckpointRef
    val_bpb: float | None  # None: not measured (an earlier checkpoint when the figures are not averaged)
    core: float | None = None
    core_lp: float | None = None
    core_margin: float | None = None
    tasks: dict[str, dict[str, float | None]] = field(default_factory=dict)  # label: centered, lp, margin

    @classmethod
    def of(
        cls, checkpoint: CheckpointRef, bpb: BpbResult | None, core: CoreResult | None
    ) -> CheckpointScores:
        tasks = {
            label: {"centered": t.centered, "lp": t.logprob_per_byte, "margin": t.mean_margin}
            for label, t in (core.tasks.items() if core else ())
        }
        return cls(
            checkpoint, bpb.bpb if bpb else None, core.core if core else None, core.core_lp if core else None,
            core.core_margin if core else None, tasks,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "checkpoint": self.checkpoint.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckpointScores:
        return cls(
            CheckpointRef.from_json(d["checkpoint"]),  # type: ignore[arg-type]
            d.get("val_bpb"), d.get("core"), d.get("core_lp"), d.get("core_margin"), dict(d.get("tasks") or {}),
        )  # fmt: skip


@dataclass(frozen=True)
class EvalResult:
    """eval.json: one evaluation of one run (see the module docstring)."""

    run: str
    checkpoint: CheckpointRef | None  # the final checkpoint (None: an eval.json older than version 2)
    run_ended: float | None  # state.json's end time of the run when it was evaluated
    eval_set: EvalSetRef | None
    bpb: BpbResult | None  # whole documents: the headline val bpb
    packed: BpbResult | None = None  # nanochat's packed stream, the second labelled number
    core: CoreResult | None = None
    max_tokens: int | None = None  # None: every document; else a seeded sample of whole documents
    checkpoints: list[CheckpointScores] = field(default_factory=list)  # the last k, oldest first
    averaged: int = 1  # headline figures are the mean over the last `averaged` checkpoints
    # the engine's own numbers, labelled (the nanochat engine: its own last val bpb)
    engine: dict[str, Any] = field(default_factory=dict)
    version: int = VERSION
    legacy: dict[str, Any] = field(default_factory=dict)  # an older eval.json's fields, kept to name them

    @property
    def step(self) -> int | None:
        return self.checkpoint.step if self.checkpoint else self.legacy.get("step")

    @property
    def val_bpb(self) -> float | None:
        if self.bpb is not None:
            return self.bpb.bpb
        v = self.legacy.get("val_bpb")
        return None if v is None else float(v)

    @property
    def core_value(self) -> float | None:
        if self.core is not None:
            return self.core.core
        v = self.legacy.get("core")
        return None if v is None else float(v)

    @property
    def method(self) -> str | None:
        return self.bpb.method.kind if self.bpb else None

    def to_json(self) -> dict[str, Any]:
        """eval.json. The flat keys of armlab 0.2 (`val_bpb`, `core`, `core_tasks`, `bundle`,
        `val_bpb_per_doc`, ...) are kept beside the records for readers of the old format."""
        core = self.core.to_json() if self.core else None
        flat: dict[str, Any] = {
            "step": self.step,
            "run_ended": self.run_ended,
            "max_tokens": self.max_tokens,
            "max_per_task": self.core.max_per_task if self.core else None,
            "bundle_sha256": (self.core.bundle or {}).get("sha256") if self.core else None,
            "val_bpb": self.val_bpb,
            "val_bpb_tokens": self.bpb.tokens if self.bpb else None,
            "val_bpb_docs": self.bpb.docs if self.bpb else None,
            "val_bpb_per_doc": (
                {"nats": self.bpb.per_doc_nats, "bytes": self.bpb.per_doc_bytes}
                if self.bpb and self.bpb.per_doc_nats is not None
                else None
            ),
            "core": core["core"] if core else None,
            "core_lp": core["core_lp"] if core else None,
            "core_margin": core["core_margin"] if core else None,
            "core_tasks": core["tasks"] if core else {},
            "bundle": core["bundle"] if core else None,
        }
        return {
            "version": self.version,
            "run": self.run,
            "checkpoint": self.checkpoint.to_json() if self.checkpoint else None,
            "eval_set": self.eval_set.to_json() if self.eval_set else None,
            "bpb": {k: v for k, v in self.bpb.to_json().items() if k != "per_doc"} if self.bpb else None,
            "packed": self.packed.to_json() if self.packed else None,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "averaged": self.averaged,
            "engine": self.engine,
            **flat,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], run: str = "") -> EvalResult:
        if int(d.get("version") or 1) < VERSION:
            return cls(run=run, checkpoint=None, run_ended=d.get("run_ended"), eval_set=None, bpb=None,
                       version=int(d.get("version") or 1), legacy=dict(d))  # fmt: skip
        bpb = dict(d["bpb"]) if d.get("bpb") else None
        if bpb is not None and d.get("val_bpb_per_doc"):
            bpb["per_doc"] = d["val_bpb_per_doc"]
        core = None
        if d.get("core_tasks"):
            core = CoreResult.from_json(
                {"tasks": d["core_tasks"], "bundle": d.get("bundle"), "max_per_task": d.get("max_per_task")}
            )
        return cls(
            run=str(d.get("run") or run),
            checkpoint=CheckpointRef.from_json(d.get("checkpoint")),
            run_ended=d.get("run_ended"),
            eval_set=EvalSetRef.from_json(d.get("eval_set")),
            bpb=BpbResult.from_json(bpb),
            packed=BpbResult.from_json(d.get("packed")),
            core=core,
            max_tokens=d.get("max_tokens"),
            checkpoints=[CheckpointScores.from_json(c) for c in d.get("checkpoints") or []],
            averaged=int(d.get("averaged") or 1),
            engine=dict(d.get("engine") or {}),
            version=int(d["version"]),
        )


@dataclass(frozen=True)
class CheckpointEval:
    """What an engine's `evaluate` returns for one checkpoint (armlab.train.engines.EvalRequest)."""

    bpb: BpbResult | None  # whole documents (None: not asked for)
    packed: BpbResult | None = None  # nanochat's packed stream (the final checkpoint only)
    core: CoreResult | None = None
    engine: dict[str, Any] = field(default_factory=dict)  # the engine's own numbers, labelled
