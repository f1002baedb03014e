"""The seeds an experiment plans per arm: `train.seeds`, plus the seeds `armlab run --until-decided`
added to the arms it could not yet tell apart, recorded in `<workdir>/seeds.json`.

The file, not the experiment file, holds them, so the user's experiment stays as written and a
rerun of `run --until-decided` goes on from where it was; `seeds` is not part of any fingerprint,
so an added seed's run compares with the others. Every command that lists an experiment's runs
(`compare`, `status`, the schedule of `run` and `launch`) asks `planned_seeds`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from armlab.workdir import Workdir, atomic_write_text, read_json

SEEDS_JSON = "seeds.json"


@dataclass(frozen=True)
class Round:
    """One decision of `run --until-decided`: what it saw and what it did."""

    seeds: dict[str, int]  # arm -> finished seeds it saw
    undecided: list[str]  # arms whose difference interval straddled 0
    added: dict[str, int]  # arm -> the seed added (empty: it stopped)
    reason: str  # the line it printed


@dataclass(frozen=True)
class ExtraSeeds:
    """Seeds beyond `train.seeds`, per arm, in the order they were added."""

    arms: dict[str, list[int]] = field(default_factory=dict)
    rounds: list[Round] = field(default_factory=list)
    max_seeds: int | None = None  # `--max-seeds` of the run that added them
    start: int | None = None  # seeds per arm before the first added one (len(train.seeds))

    @property
    def looks(self) -> int:
        """How many times the loop could look at the difference: at `start` seeds, then after each
        seed up to `max_seeds` (1 when no loop ran)."""
        return max(1, (self.max_seeds or 0) - (self.start or 0) + 1) if self.max_seeds else 1

    @property
    def level(self) -> float:
        """The level of every difference interval of an experiment that added seeds until decided:
        95% over all its looks together (Bonferroni), since stopping at the first look whose 95%
        interval excludes 0 would claim differences more often than 5% of the time."""
        return 1 - 0.05 / self.looks

    def of(self, arm: str) -> list[int]:
        return list(self.arms.get(arm, []))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExtraSeeds:
        return cls(
            {a: [int(s) for s in v] for a, v in (d.get("arms") or {}).items()},
            [Round(**r) for r in d.get("rounds") or []],
            d.get("max_seeds"),
            d.get("start"),
        )


def read_extra_seeds(wd: Workdir) -> ExtraSeeds:
    path = wd.root / SEEDS_JSON
    return ExtraSeeds.from_json(read_json(path)) if path.is_file() else ExtraSeeds()


def write_extra_seeds(wd: Workdir, extra: ExtraSeeds) -> None:
    atomic_write_text(wd.root / SEEDS_JSON, extra.to_json() + "\n")


def extra_seeds(exp: Any) -> ExtraSeeds:
    """The experiment's `seeds.json` (empty when there is none)."""
    from armlab.workdir import open_workdir

    if not exp.workdir_path.is_dir():
        return ExtraSeeds()
    return read_extra_seeds(open_workdir(exp, create=False))


def planned_seeds(exp: Any) -> dict[str, list[int]]:
    """arm -> the seeds the experiment plans for it: train.seeds, then any added ones."""
    extra = extra_seeds(exp)
    return {a.name: list(exp.train.seeds) + [s for s in extra.of(a.name) if s not in exp.train.seeds]
            for a in exp.arms}  # fmt: skip


def planned_runs(exp: Any) -> list[tuple[str, int, str]]:
    """(arm, seed, run name) of every run the experiment plans: each ladder rung (or the one
    experiment) x arm x planned seed."""
    seeds = planned_seeds(exp)
    return [(a.name, s, rung.run_name(a.name, s)) for rung in exp.rungs() for a in exp.arms for s in seeds[a.name]]
