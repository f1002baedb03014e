"""What prepare builds, and the one place its data fingerprints are made.

A `Target` is one output dir: the eval set, the tokenizer sample, or an arm. Its fingerprint
covers everything its bytes depend on (the pool's files and their content identities, the eval
and shard settings, the arm's selection), so a complete dir whose manifest carries the same
fingerprint is up to date, and any other is stale. Publish and pull (`data/blob/checks.py`)
compare published manifests with the selections made here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from armlab.data.pool import PoolFile
from armlab.data.prepare.keys import key_columns
from armlab.data.select import SALT_SHUFFLE, SALT_TOKENIZER
from armlab.data.shards import MANIFEST
from armlab.errors import ArmlabError
from armlab.spec import ArmSpec, Experiment, PoolSpec, fingerprint, fingerprint_diff
from armlab.workdir import Workdir, check_writable, read_json

EVAL = "eval"
TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class Target:
    """One output dir fed by the text pass: the eval set, the tokenizer sample, or a pool arm."""

    name: str
    out_dir: Path
    shuffle_seed: int
    columns: tuple[str, ...]  # columns written to the shards
    selection: dict[str, Any]
    fingerprint: str
    salt: int = SALT_SHUFFLE  # the shards are in ascending mix(key, shuffle_seed, salt)
    scorer: dict[str, Any] | None = None  # the scores an arm selects on (data.score.fresh.Scored.describe)
    # The eval set only: label columns its shards must carry (`report.group_label`). They are
    # not part of the fingerprint: labels say which group a document is in, not which documents
    # the eval set holds, so adding them re-writes the eval set's shards (same texts, same order)
    # without making any run's evaluation stale.
    labels: tuple[str, ...] = ()

    @property
    def partial_dir(self) -> Path:
        """Where the shards are written before the swap into `out_dir`."""
        return self.out_dir.with_name(f".{self.out_dir.name}.partial")


def pool_listing(files: list[PoolFile]) -> list[list[Any]]:
    """[name, size, content identity] of each pool file: what a prepared dir was derived from."""
    return [[f.name, f.size, f.identity] for f in files]


def pool_fingerprint(spec: PoolSpec, files: list[PoolFile]) -> str:
    # `fetch` says how the bytes travel, not what they are: switching it keeps prepared data valid
    return fingerprint({"pool": spec.model_dump(exclude={"fetch"}), "files": pool_listing(files)})


def key_file_fingerprint(pf: PoolFile, columns: list[str]) -> str:
    """A file's key-pass output depends on its contents and the columns read, nothing else."""
    return fingerprint([pf.name, pf.size, pf.identity, columns])


def pool_changes(old: list[list[Any]] | None, files: list[PoolFile]) -> list[str]:
    """Which pool files differ from an earlier listing (`pool_listing`): changed, new, gone."""
    if old is None:
        return []
    before = {str(n): (s, i) for n, s, i in old}
    now = {n: (s, i) for n, s, i in pool_listing(files)}
    out = [f"{n} changed" for n in sorted(set(before) & set(now)) if before[n] != now[n]]
    out += [f"{n} is new" for n in sorted(set(now) - set(before))]
    out += [f"{n} is gone" for n in sorted(set(before) - set(now))]
    return out


def eval_selection(exp: Experiment) -> dict[str, Any]:
    """The `selection` an eval manifest records."""
    return {"kind": "eval", **exp.eval.model_dump()}


def arm_selection(exp: Experiment, arm: ArmSpec) -> dict[str, Any]:
    # `score` (a scorer) only when set: the selections, so the fingerprints, of arms on a score
    # column stay what they were before scorers existed
    sel = arm.model_dump(exclude={"download_mode", "concurrency"} | ({"score"} if arm.score is None else set()))
    by = arm.score_column or f"scorer {arm.score}'s score"
    if arm.kind == "random":
        sel["semantics"] = "uniform(key, seed) < ratio: each non-eval document independently (binomial size)"
    elif arm.kind == "top":
        sel["semantics"] = (
            f"exactly the top ratio of the non-eval pool by {by} ({arm.by}); ties broken by mix(key, seed); "
            "documents without a score rank last"
        )
    elif arm.kind == "sample":
        sel["semantics"] = (
            f"Gumbel top-k: without replacement, P ~ exp({by} / temperature), ratio of the non-eval pool ({arm.by}); "
            "documents without a score rank last"
        )
    if arm.score:
        s = exp.scorer(arm.score)
        sel["scorer"] = {k: v for k, v in s.settings().items() if k != "batch_size"}
    if arm.max_rows or arm.max_tokens:
        sel["cap_semantics"] = (
            "a seeded uniform sample of the arm of at most max_rows rows / max_tokens tokens"
        )
    return sel


def eval_labels(exp: Experiment, arms: list[ArmSpec], scorers: list[str] = ()) -> tuple[str, ...]:
    """The label column written beside each eval document for `[report] group_column`, so that
    `compare` can split val bpb by it (`report/groups.py`): `group:<column>` (a category, string),
    `score:<column>` (a numeric pool column, float) or `scorer:<name>` (a scorer's score, float;
    only when this prepare joins that scorer's sidecars). Only what the report asks for: the eval
    shards of two experiments that differ in nothing else stay byte-identical."""
    cols = key_columns(exp, arms)
    label = exp.report.group_label(scorers)
    attainable = {f"group:{cols.group}"} | {f"score:{c}" for c in cols.scores} | {f"scorer:{n}" for n in scorers}
    return (label,) if label and label in attainable else ()


def plan_targets(
    exp: Experiment, wd: Workdir, arms: list[ArmSpec], pool_fp: str, scored: dict[str, Any] | None = None
) -> list[Target]:
    """The eval set, the tokenizer sample and each pool arm, fingerprinted over the pool `pool_fp`
    (and, for an arm on a scorer, over its scores: `scored[name]`, data.score.fresh.Scored)."""
    shards = exp.shards.model_dump()
    common = {"pool_fingerprint": pool_fp, "eval": exp.eval.model_dump(), "shards": shards}
    out = [
        Target(
            EVAL,
            wd.eval_dir,
            exp.eval.seed,
            ("text", "key", "text_key", *eval_labels(exp, arms, list(scored or {}))),
            eval_selection(exp),
            fingerprint({**common, "target": "eval"}),
            labels=eval_labels(exp, arms, list(scored or {})),
        ),
        Target(
            TOKENIZER,
            wd.tokenizer_sample_dir,
            exp.tokenizer.seed,
            ("text",),
            {
                "kind": "tokenizer-sample",
                "train_chars": exp.tokenizer.train_chars,
                "doc_cap": exp.tokenizer.doc_cap,
                "seed": exp.tokenizer.seed,
                "semantics": "the first non-eval documents in ascending mix(key, seed, SALT_TOKENIZER) whose "
                "chars, each capped at doc_cap, reach train_chars",
            },
            fingerprint(
                {
                    **common,
                    "target": "tokenizer",
                    "tok": [exp.tokenizer.train_chars, exp.tokenizer.seed, exp.tokenizer.doc_cap],
                }
            ),
            salt=SALT_TOKENIZER,
        ),
    ]
    for arm in arms:
        sel = arm_selection(exp, arm)
        fp_of: dict[str, Any] = {**common, "arm": sel}
        scorer = None
        if arm.score:
            scorer = (scored or {})[arm.score].describe()
            fp_of["scores"] = scorer["identity"]  # rescored with another model: another arm
        out.append(
            Target(arm.name, wd.data_dir(arm.name), arm.seed, ("text",), sel, fingerprint(fp_of), scorer=scorer)
        )
    return out


def prebuilt_target(
    exp: Experiment, wd: Workdir, arm: ArmSpec, paths: list[Path], eval_fp: str | None
) -> Target:
    """A prebuilt arm: its source files (names and sizes), minus the eval set `eval_fp`, reshuffled."""
    sel = {
        **arm_selection(exp, arm),
        "source_fingerprint": fingerprint([[p.name, p.stat().st_size] for p in paths]),
        "semantics": "the prebuilt files minus the eval docs (by id, else by text hash), reshuffled",
    }
    return Target(
        arm.name,
        wd.data_dir(arm.name),
        arm.seed,
        ("text",),
        sel,
        fingerprint({"arm": sel, "eval": eval_fp, "shards": exp.shards.model_dump()}),
    )


def needs_work(t: Target, force: bool, overwrite: bool, files: list[PoolFile] | None = None) -> bool:
    """False when `t.out_dir` is already complete from the same spec and pool files; refuses
    unsafe overwrites, naming the pool files that changed when that is the difference."""
    mpath = t.out_dir / MANIFEST
    if mpath.is_file():
        m = read_json(mpath)
        same = m.get("complete") and m.get("fingerprint") == t.fingerprint
        if same and set(t.labels) <= set(m.get("columns") or ()):
            return False
        # same documents but without the label columns the report needs: written again, below
        if m.get("complete") and not same and not overwrite:
            diff = fingerprint_diff(m.get("selection", {}), t.selection)
            changed = pool_changes(m.get("pool_files"), files) if files is not None and not diff else []
            if changed:
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                raise ArmlabError(
                    f"{t.out_dir}: {t.name!r} is out of date: pool file {changed[0]}{more} since it was prepared; "
                    "rerun with --overwrite to re-prepare it from the pool as it is now"
                )
            was = (m.get("scorer") or {}).get("identity")
            if not diff and t.scorer is not None and was != t.scorer["identity"]:
                raise ArmlabError(
                    f"{t.out_dir}: {t.name!r} was selected on other scores of scorer {t.scorer['name']!r} "
                    "(rescored since); rerun with --overwrite to re-prepare it from the scores as they are now"
                )
            raise ArmlabError(
                f"{t.out_dir}: holds {t.name!r} prepared from a different spec "
                f"({', '.join(diff or ['pool, eval or shard settings'])} differ); rerun with --overwrite to replace it"
            )
    check_writable(t.out_dir, force=force, action=f"prepare {t.name!r}")
    return True
