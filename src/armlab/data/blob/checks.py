"""Is a published or downloaded dir this experiment's? The spec checks that keep arms comparable:
a tokenizer of this spec whose files match its fingerprint, an eval set of this spec, an arm of
this experiment's pool, eval set, shard layout and selection (used by both publish and pull); and
`shard_problem`, whether a downloaded parquet file can be a shard at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from armlab.data.blob.address import MANIFEST_NAME
from armlab.data.prepare.targets import arm_selection, eval_selection
from armlab.errors import ArmlabError
from armlab.spec import fingerprint_diff
from armlab.store.net import describe
from armlab.workdir import read_json


def shard_problem(name: str, path: Path) -> str | None:
    """Why downloaded file `name` (at `path`) is not a usable shard (its footer only), or None;
    files other than .parquet are not shards and pass."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not name.endswith(".parquet"):
        return None
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        return f"not a parquet file: {describe(e)}"
    if "text" not in schema.names:
        return f"no 'text' column (columns: {', '.join(schema.names[:8])})"
    t = schema.field("text").type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        return f"column 'text' is {t}, not string"
    return None


def _tokenizer_files() -> list[str]:
    from armlab.tokenizer import ENCODING_FILE, NANOCHAT_TOKEN_BYTES_FILE, TOKEN_BYTES_FILE

    return [ENCODING_FILE, NANOCHAT_TOKEN_BYTES_FILE, TOKEN_BYTES_FILE]


def _check_tokenizer_spec(exp: Any, manifest: dict[str, Any], where: str) -> None:
    """The tokenizer must be this experiment's (the same check `load_experiment_tokenizer` makes)."""
    from armlab.tokenizer import spec_diff

    saved = manifest.get("spec") or {}
    changed = spec_diff(saved, exp)
    if changed:
        raise ArmlabError(
            f"{where}: tokenizer of experiment {saved.get('experiment')!r}, differs from this spec in: "
            f"{', '.join(changed)}; use the tokenizer published for this experiment"
        )


def _check_tokenizer_files(directory: Path, manifest: dict[str, Any]) -> None:
    """tokenizer.pkl must have the manifest's fingerprint, token_bytes.npy must be its token_bytes
    (the tokenizer manifest lists no file hashes: this is its content check)."""
    import pickle

    import numpy as np

    from armlab.tokenizer import ENCODING_FILE, TOKEN_BYTES_FILE, Tokenizer

    try:
        with open(directory / ENCODING_FILE, "rb") as f:
            tok = Tokenizer(pickle.load(f))
        token_bytes = np.load(directory / TOKEN_BYTES_FILE)
    except (OSError, ValueError, pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise ArmlabError(f"{directory}: unreadable tokenizer files ({describe(e)})") from None
    if tok.fingerprint != manifest.get("fingerprint"):
        raise ArmlabError(
            f"{directory / ENCODING_FILE}: fingerprint {tok.fingerprint}, but {MANIFEST_NAME} says "
            f"{manifest.get('fingerprint')}"
        )
    if not np.array_equal(token_bytes, tok.token_bytes):
        raise ArmlabError(f"{directory / TOKEN_BYTES_FILE}: does not match {ENCODING_FILE}")


def _check_eval_spec(exp: Any, manifest: dict[str, Any], where: str) -> None:
    ours = {"selection": eval_selection(exp), "shards": exp.shards.model_dump()}
    diff = fingerprint_diff(ours, {k: manifest.get(k) for k in ours})
    if diff:
        raise ArmlabError(
            f"{where}: eval set of a different spec ({', '.join(diff[:4])} differ); "
            "use the eval set published for this experiment"
        )


def _check_same_spec(exp: Any, spec: Any, eval_dir: Path, manifest: dict[str, Any], where: str) -> None:
    """A published arm must come from this experiment's pool, eval set, shard layout and arm
    selection: one from another eval set may hold this experiment's eval docs (DESIGN.md
    invariant 2). The eval set is compared when it is prepared here (it is what training uses)."""
    ours: dict[str, Any] = {"shards": exp.shards.model_dump()}
    if spec.kind != "prebuilt":  # a prebuilt arm's selection names its source files, unknown here
        ours["selection"] = arm_selection(exp, spec)
    if (eval_dir / MANIFEST_NAME).is_file():
        ev = read_json(eval_dir / MANIFEST_NAME)
        if "eval_fingerprint" in manifest:  # a prepared prebuilt arm records the eval set it excluded
            ours["eval_fingerprint"] = ev.get("fingerprint")
        else:
            ours.update({k: ev.get(k) for k in ("pool_fingerprint", "eval_cut")})
    diff = fingerprint_diff(ours, {k: manifest.get(k) for k in ours})
    if diff:
        raise ArmlabError(
            f"{where}: published from a different spec ({', '.join(diff[:4])} differ{' ...' if len(diff) > 4 else ''}); "
            f"pull it into an experiment whose pool, eval, shards and arm {spec.name!r} match, or prepare the arm here"
        )
