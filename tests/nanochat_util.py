"""Real nanochat for the engine tests: the shared snapshots, a venv that runs them, copies to play with.

`../shared/nanochat/<commit>/` (beside the repo root; `ARMLAB_NANOCHAT_SNAPSHOTS` points
elsewhere) holds unmodified nanochat at 48804bf and 92d63d4. A user's clone of armlab has no
`../shared`: there, and only there, the tests skip, saying why. In CI it exists and they run.

nanochat's interpreter is a venv under the repo's ignored `.cache/nanochat-venv/` that sees
this (armlab's) venv through a .pth file (so torch, numpy, pyarrow, rustbpe, tiktoken, psutil,
requests, filelock, pyyaml come from armlab's install: torch 2.13.0 CPU, never a second copy)
plus what nanochat imports and armlab does not: wandb (imported by base_train, off with
--run=dummy) and HF tokenizers (imported by 48804bf's tokenizer module). `python -m venv
--system-site-packages` would not do: from a venv's interpreter it exposes the *base* Python's
site-packages, not the venv's. armlab itself imports there too (for the tests that load a
nanochat checkpoint through the engine). Built once (a few seconds from PyPI), reused while armlab's venv
and the package list are the same.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
COMMITS = ("48804bf", "92d63d4")
EXTRA_PACKAGES = ("wandb", "tokenizers")  # what nanochat imports beyond armlab's own dependencies
VENV = REPO / ".cache" / "nanochat-venv"


def snapshots_root() -> Path:
    return Path(os.environ.get("ARMLAB_NANOCHAT_SNAPSHOTS", REPO.parent / "shared" / "nanochat"))


def snapshot(commit: str) -> Path:
    """The unmodified nanochat snapshot at `commit`, or a skip saying why there is none."""
    path = snapshots_root() / commit
    if not (path / "scripts" / "base_train.py").is_file():
        pytest.skip(
            f"no nanochat snapshot at {path} (a clone without the team's ../shared fixtures); "
            "set ARMLAB_NANOCHAT_SNAPSHOTS to a dir holding 48804bf/ and 92d63d4/ to run these tests"
        )
    return path


def copy_checkout(commit: str, dest: Path, git: bool = False) -> Path:
    """A private copy of the snapshot (nanochat writes __pycache__ into its tree); with `git`, a
    git repository with the copy as its one commit."""
    shutil.copytree(snapshot(commit), dest, ignore=shutil.ignore_patterns("__pycache__"))
    if git:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
               "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}  # fmt: skip
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"nanochat {commit}"]):
            subprocess.run(["git", "-C", str(dest), *args], check=True, env=env, capture_output=True)
        (dest / ".gitignore").write_text(".venv/\n__pycache__/\n")
        subprocess.run(["git", "-C", str(dest), "add", ".gitignore"], check=True)
        subprocess.run(["git", "-C", str(dest), "commit", "-q", "-m", "ignore"], check=True, env=env)
    return dest


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def nanochat_python() -> Path:
    """The interpreter nanochat's tests run with (built on first use, see the module docstring)."""
    VENV.parent.mkdir(parents=True, exist_ok=True)
    here = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    stamp = {"armlab_python": sys.executable, "site": here, "packages": list(EXTRA_PACKAGES), "pth": 2}
    with FileLock(str(VENV) + ".lock"):
        stamp_file = VENV / "armlab-stamp.json"
        if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp and _python(VENV).exists():
            return _python(VENV)
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        site = Path(
            subprocess.run(
                [str(_python(VENV)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                check=True, capture_output=True, text=True,
            ).stdout.strip()
        )  # fmt: skip
        # an `import` line of a .pth file runs: addsitedir also reads the .pth files there (armlab's
        # editable install is one), which a plain path line would not
        adds = "; ".join(f"site.addsitedir({p!r})" for p in dict.fromkeys(here))
        (site / "armlab-venv.pth").write_text(f"import site; {adds}\n")
        pip = subprocess.run(
            [str(_python(VENV)), "-m", "pip", "install", "-q", "--disable-pip-version-check", *EXTRA_PACKAGES],
            capture_output=True, text=True,
        )  # fmt: skip
        if pip.returncode != 0:
            raise RuntimeError(
                f"pip install {' '.join(EXTRA_PACKAGES)} into {VENV} failed:\n{pip.stderr[-2000:]}"
            )
        stamp_file.write_text(json.dumps(stamp))
    return _python(VENV)


def bare_python(dest: Path) -> Path:
    """A real interpreter without torch (a fresh venv of the base Python, no site packages)."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(dest)], check=True)
    return _python(dest)
