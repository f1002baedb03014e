"""What a nanochat checkout is: its interpreter, its base_train flags and its exact source.

The nanochat engine trains with the researcher's own clone (`[nanochat] path`), so before a
run starts armlab asks that clone, not a copy of nanochat it carries:

- is it a nanochat checkout at all (`scripts/base_train.py`, `nanochat/`)?
- which Python runs it: `[nanochat] python`, else the checkout's own `uv sync` venv
  (`<path>/.venv/bin/python`), else the interpreter running armlab; and does it import torch?
- which flags does *this* version's `python -m scripts.base_train --help` accept? They differ
  between versions (48804bf has --warmup-ratio and --adam-beta1/2, 92d63d4 has --warmup-steps),
  so the flag mapping is checked against the real parser, never a table of versions.
- which source is it: the git commit, whether the tree is dirty and a hash of the uncommitted
  diff (a patched checkout is another engine, so its runs never compare with unpatched ones).
  A plain directory without `.git` (a tarball, a copied snapshot) is identified by a content
  hash of its Python files and pyproject.toml instead.

`--help` imports torch, wandb and the model code (4-5 s), so its parsed flags are cached under
`$ARMLAB_CACHE/nanochat/`, keyed by the bytes of base_train.py and the interpreter's path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from armlab.errors import ArmlabError
from armlab.workdir import atomic_write_json

PythonSource = Literal["[nanochat] python", "checkout venv", "armlab's interpreter"]

PROBE_TIMEOUT_S = 300  # a cold import of torch + wandb on a busy shared disk can be slow
# Directories that never hold the checkout's own source (content hash of a plain directory).
NOT_SOURCE = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "node_modules",
    "build",
    "dist",
}
FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# Runs in the checkout's interpreter: torch's version and devices as one JSON line.
_TORCH_PROBE = """\
import json, sys
try:
    import torch
except Exception as e:
    print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    sys.exit(3)
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
                  "executable": sys.executable}))
"""


@dataclass(frozen=True)
class SourceIdentity:
    """Which nanochat source a checkout holds."""

    commit: str  # the git commit, or "content:<sha16>" for a directory without .git
    git: bool
    dirty: bool | None  # None: cannot tell (not a git checkout)
    diff_sha256: str | None  # hash of the uncommitted changes; None when clean or not git
    changed: tuple[str, ...] = ()  # the dirty paths (the first few name it in messages)

    @property
    def short(self) -> str:
        """How messages name it: `48804bf`, `48804bf+dirty(1a2b3c4d)`, `content:1a2b3c4d5e6f7a8b`."""
        base = self.commit[:7] if self.git else self.commit
        return f"{base}+dirty({self.diff_sha256[:8]})" if self.dirty and self.diff_sha256 else base


@dataclass(frozen=True)
class TorchInfo:
    version: str
    cuda: bool
    gpus: int


@dataclass(frozen=True)
class Checkout:
    """A nanochat checkout armlab has looked at (see `inspect_checkout`)."""

    path: Path
    python: Path
    python_source: PythonSource
    source: SourceIdentity
    torch: TorchInfo
    flags: frozenset[str] = field(default_factory=frozenset)  # base_train's long options, e.g. "--depth"

    def describe(self) -> dict[str, object]:
        """What run.json records about the checkout."""
        return {
            "path": str(self.path),
            "python": str(self.python),
            "python_source": self.python_source,
            "commit": self.source.commit,
            "git": self.source.git,
            "dirty": self.source.dirty,
            "diff_sha256": self.source.diff_sha256,
            "changed": list(self.source.changed[:20]),
            "torch": self.torch.version,
        }


# -- the checkout and its interpreter ---------------------------------------------------------------
def checkout_path(raw: str | Path) -> Path:
    """The checkout root (`~` expanded); refuses a path that is not a nanochat checkout."""
    path = Path(os.path.expandvars(str(raw))).expanduser()
    if not path.is_dir():
        raise ArmlabError(
            f"nanochat checkout {path}: no such directory; set [nanochat] path (or --nanochat DIR) to your "
            "nanochat clone"
        )
    missing = [p for p in ("scripts/base_train.py", "nanochat") if not (path / p).exists()]
    if missing:
        raise ArmlabError(
            f"nanochat checkout {path}: not a nanochat checkout (no {' or '.join(missing)}); set [nanochat] path "
            "(or --nanochat DIR) to the root of your nanochat clone"
        )
    return path.resolve()


def resolve_python(path: Path, python: str | None) -> tuple[Path, PythonSource]:
    """The interpreter that runs the checkout, and why that one."""
    if python:
        p = Path(os.path.expandvars(python)).expanduser()
        p = p if p.is_absolute() else path / p
        if not p.exists():
            raise ArmlabError(
                f"[nanochat] python {p}: no such file; point it at the interpreter of nanochat's venv"
            )
        return p, "[nanochat] python"
    venv = path / ".venv" / "bin" / "python"
    if venv.exists():
        return venv, "checkout venv"
    return Path(sys.executable), "armlab's interpreter"


def probe_torch(python: Path, source: PythonSource, cwd: Path) -> TorchInfo:
    """Refuse an interpreter that cannot import torch (one line naming it and the fix)."""
    try:
        p = subprocess.run(
            [str(python), "-c", _TORCH_PROBE],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except OSError as e:
        raise ArmlabError(f"nanochat python {python} ({source}): cannot run it ({e.strerror})") from None
    last = (p.stdout.strip().splitlines() or [""])[-1]
    try:
        info = json.loads(last)
    except ValueError:
        info = {"error": (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]}
    if p.returncode != 0 or "error" in info:
        raise ArmlabError(
            f"nanochat python {python} ({source}) cannot import torch ({info.get('error')}); run `uv sync` in "
            f"{cwd}, or set [nanochat] python to an interpreter that has torch"
        )
    return TorchInfo(version=str(info["torch"]), cuda=bool(info["cuda"]), gpus=int(info["gpus"]))


# -- base_train's flags ------------------------------------------------------------------------------
def parse_help(text: str) -> frozenset[str]:
    """The long options an argparse `--help` text lists (banner lines before `usage:` ignored)."""
    start = text.find("usage:")
    return frozenset(FLAG_RE.findall(text[start:] if start >= 0 else text)) - {"--help"}


def _cache_dir() -> Path:
    return Path(os.environ.get("ARMLAB_CACHE", "~/.cache/armlab")).expanduser() / "nanochat"


def _help_key(path: Path, python: Path) -> str:
    h = hashlib.sha256((path / "scripts" / "base_train.py").read_bytes())
    h.update(b"\0" + str(python).encode())
    return h.hexdigest()[:24]


def run_help(path: Path, python: Path, source: PythonSource) -> str:
    """`python -m scripts.base_train --help` in the checkout, in a throwaway NANOCHAT_BASE_DIR
    (importing nanochat.dataset creates its data dir under the base dir)."""
    with tempfile.TemporaryDirectory(prefix="armlab-nanochat-help-") as base:
        env = {**os.environ, "NANOCHAT_BASE_DIR": base, "TORCHDYNAMO_DISABLE": "1", "WANDB_MODE": "disabled"}
        try:
            p = subprocess.run(
                [str(python), "-m", "scripts.base_train", "--help"],
                cwd=path, env=env, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise ArmlabError(
                f"nanochat checkout {path}: `python -m scripts.base_train --help` did not finish in "
                f"{PROBE_TIMEOUT_S}s"
            ) from None
    if p.returncode != 0 or "usage:" not in p.stdout:
        lines = [ln.strip() for ln in (p.stderr + p.stdout).splitlines() if ln.strip()]
        cause = lines[-1] if lines else f"exit status {p.returncode}"
        raise ArmlabError(
            f"nanochat checkout {path}: `{python} -m scripts.base_train --help` failed ({cause}); install what it "
            f"needs into that interpreter ({source}), e.g. `uv sync` in the checkout"
        )
    return p.stdout


def base_train_flags(path: Path, python: Path, source: PythonSource, cached: bool = True) -> frozenset[str]:
    """base_train's long options (cached by base_train.py's bytes and the interpreter)."""
    cache = _cache_dir() / f"help-{_help_key(path, python)}.json"
    if cached and cache.is_file():
        try:
            return frozenset(json.loads(cache.read_text())["flags"])
        except (OSError, ValueError, KeyError):
            pass  # a torn or foreign cache file: ask the checkout again
    flags = parse_help(run_help(path, python, source))
    if "--depth" not in flags:
        raise ArmlabError(
            f"nanochat checkout {path}: scripts.base_train --help lists no --depth; is this nanochat's base_train?"
        )
    atomic_write_json(cache, {"flags": sorted(flags), "path": str(path), "python": str(python)})
    return flags


# -- the exact source ---------------------------------------------------------------------------------
def _git(path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, timeout=120)


def _is_git_root(path: Path) -> bool:
    try:
        p = _git(path, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.TimeoutExpired):
        return False  # no git on this machine: identify the source by content
    return p.returncode == 0 and Path(p.stdout.decode().strip()).resolve() == path.resolve()


def _ignored(rel: str) -> bool:
    parts = rel.split("/")
    return any(part in NOT_SOURCE or part.endswith(".egg-info") for part in parts) or rel.endswith(".pyc")


def content_hash(path: Path) -> str:
    """sha256 (16 hex) of every .py file and pyproject.toml under the checkout, by relative path."""
    h = hashlib.sha256()
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and (p.suffix == ".py" or p.name == "pyproject.toml")
        and not _ignored(p.relative_to(path).as_posix())
    )  # fmt: skip
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _git_identity(path: Path) -> SourceIdentity:
    head = _git(path, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise ArmlabError(
            f"nanochat checkout {path}: a git repository without a commit; commit it (or remove .git)"
        )
    status = _git(path, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    entries = [e for e in status.stdout.decode("utf-8", "replace").split("\0") if e]
    changed, untracked = [], []
    for e in entries:
        code, rel = e[:2], e[3:]
        if _ignored(rel):
            continue
        changed.append(rel)
        if code == "??":
            untracked.append(rel)
    if not changed:
        return SourceIdentity(commit=head.stdout.decode().strip(), git=True, dirty=False, diff_sha256=None)
    h = hashlib.sha256(_git(path, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff").stdout)
    for rel in sorted(untracked):  # new files are part of the patch too
        h.update(b"\0untracked\0" + rel.encode() + b"\0" + (path / rel).read_bytes())
    return SourceIdentity(
        commit=head.stdout.decode().strip(), git=True, dirty=True, diff_sha256=h.hexdigest()[:16],
        changed=tuple(sorted(changed)),
    )  # fmt: skip


def source_identity(path: Path) -> SourceIdentity:
    """The checkout's commit, dirty state and diff hash; a content hash when it is no git checkout."""
    if _is_git_root(path):
        return _git_identity(path)
    return SourceIdentity(commit=f"content:{content_hash(path)}", git=False, dirty=None, diff_sha256=None)


# -- all of it ----------------------------------------------------------------------------------------
def inspect_checkout(raw_path: str | Path, python: str | None = None, cached: bool = True) -> Checkout:
    """Look at a checkout; every problem is one ArmlabError line. Nothing is started or written
    but the --help cache (`cached=False`: ask base_train again, as doctor does)."""
    path = checkout_path(raw_path)
    py, source = resolve_python(path, python)
    torch = probe_torch(py, source, path)
    flags = base_train_flags(path, py, source, cached=cached)
    return Checkout(
        path=path, python=py, python_source=source, source=source_identity(path), torch=torch, flags=flags
    )
