"""Whether a scorer's scores can be used: every pool file scored, by this model and settings.

`check_scores` is what `prepare` asks before it reads any sidecar: an arm that selects on a
scorer whose scores are missing or stale (a pool file changed or new since it was scored, another
model or settings) is refused in one line naming the scorer, what is wrong and the command that
fixes it (`armlab score EXP --scorer NAME`). prepare does not score by itself: scoring may cost
GPU-hours on other machines (`armlab plan` prices it), and the scores of a shared scores dir
serve several experiments. Scorers no arm selects on only add their distributions to the arms'
statistics when their scores are complete; otherwise prepare says they were left out.

No model is loaded here: the identity needs a local model's content hash (cached by size and
mtime) or only the spec (URLs, hub ids). A local model file that is not on this machine (scored
on a GPU host) is trusted by its path as the manifest recorded it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.data.pool import PoolFile
from armlab.data.score import models
from armlab.data.score.sidecar import (
    ScoresManifest,
    file_meta,
    identity,
    read_manifest,
    relative_names,
    scorer_dir,
    sidecar_rel,
)
from armlab.errors import ArmlabError
from armlab.spec import ArmSpec, Experiment, ScorerSpec


@dataclass(frozen=True)
class SidecarRead:
    """One pool file's sidecar for the key pass (picklable)."""

    scorer: str
    path: Path
    expect: dict[str, Any]  # the footer it must carry (sidecar.file_meta)


@dataclass(frozen=True)
class Scored:
    """A scorer whose scores cover every pool file."""

    name: str
    directory: Path
    identity: str
    manifest: ScoresManifest
    rel: dict[str, str]  # pool file name -> relative name

    def sidecar(self, pf: PoolFile) -> SidecarRead:
        rel = self.rel[pf.name]
        return SidecarRead(
            self.name, self.directory / sidecar_rel(rel), file_meta(rel, pf, self.name, self.identity)
        )

    def describe(self) -> dict[str, Any]:
        """What an arm's manifest records about the scores it was selected on."""
        m = self.manifest
        return {
            "name": self.name,
            "identity": self.identity,
            "dir": str(self.directory),
            "model": m.model,
            "kind": m.scorer.get("kind"),
        }


def scorer_ref(exp: Experiment, s: ScorerSpec, manifest: ScoresManifest | None) -> str:
    """models.ref, except that a local model missing here is taken as the manifest recorded it
    when the spec still names the same path (scored elsewhere, prepared here)."""
    missing = models.source_of(s) == "local" and not models.local_path(s).exists()
    if missing and manifest is not None and manifest.scorer.get("model") == s.model:
        return str(manifest.model.get("ref"))
    return models.ref(s)


def freshness(exp: Experiment, s: ScorerSpec, files: list[PoolFile]) -> tuple[Scored | None, str, bool]:
    """(the scores, "", False) when usable; else (None, what is wrong, whether --overwrite is needed)."""
    directory = scorer_dir(exp, s.name)
    manifest = read_manifest(directory)
    if manifest is None:
        return None, f"has not scored the pool ({directory} holds no scores)", False
    ident = identity(s, exp, scorer_ref(exp, s, manifest))
    if manifest.identity != ident:
        return None, f"holds scores of another model or settings in {directory}", True
    rel = relative_names(exp.pool.uri, files)
    problems = []
    for pf in files:
        entry = manifest.files.get(rel[pf.name])
        if entry is None or not (directory / entry.sidecar).is_file():
            problems.append(f"{rel[pf.name]} not scored")
        elif entry.identity != pf.identity:
            problems.append(f"{rel[pf.name]} changed since it was scored")
    if problems:
        more = f", and {len(problems) - 2} more" if len(problems) > 2 else ""
        return (
            None,
            f"has no scores for {len(problems)} of {len(files)} pool files ({', '.join(problems[:2])}{more})",
            False,
        )
    return Scored(s.name, directory, ident, manifest, rel), "", False


def check_scores(
    exp: Experiment, arms: list[ArmSpec], files: list[PoolFile]
) -> tuple[dict[str, Scored], list[str]]:
    """The usable scores of every scorer, refusing arms whose scorer's are not; and a note per
    scorer no arm here selects on whose scores are left out of the statistics."""
    used: dict[str, list[str]] = {}
    for a in arms:
        if a.score:
            used.setdefault(a.score, []).append(a.name)
    out: dict[str, Scored] = {}
    notes = []
    for s in exp.scorers:
        scored, problem, overwrite = freshness(exp, s, files)
        fix = f"`armlab score EXP --scorer {s.name}{' --overwrite' if overwrite else ''}`"
        if scored is not None:
            out[s.name] = scored
        elif s.name in used:
            names = used[s.name]
            who = (
                f"arm {names[0]!r} selects"
                if len(names) == 1
                else f"arms {', '.join(map(repr, names))} select"
            )
            raise ArmlabError(f"{who} on scorer {s.name!r}, which {problem}; run {fix} first")
        else:
            notes.append(
                f"scorer {s.name!r} {problem}: its distribution is left out of the arms' statistics (run {fix})"
            )
    return out, notes
