"""`armlab setup`: bootstrap a host over SSH with the same armlab as this machine.

No git clone on the host: a wheel is built here (`pip wheel --no-deps` from the source tree),
copied over SSH, and installed into a venv (default `~/.armlab/venv`; `--system-site-packages`
reuses the host's CUDA torch). Idempotent: a host whose armlab has the same version *and* the
same source fingerprint (hash of the package files) is left alone, so a dev edit is pushed even
when the version number did not change.
"""

from __future__ import annotations

import atexit
import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import armlab
from armlab.errors import ArmlabError
from armlab.ops.ssh import DEFAULT_REMOTE_PYTHON, Remote, rpath
from armlab.progress import console
from armlab.text import plural

PACKAGE_DIR = Path(armlab.__file__).resolve().parent


FINGERPRINTED = (".py", ".toml", ".typed")


def _fingerprint(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for rel in sorted(files):
        h.update(rel.encode() + b"\0" + files[rel] + b"\0")
    return h.hexdigest()[:16]


def source_fingerprint(package_dir: Path = PACKAGE_DIR) -> str:
    """sha256 (16 hex) of the package's own files: equal here and on a host iff same code."""
    files = {
        p.relative_to(package_dir).as_posix(): p.read_bytes()
        for p in package_dir.rglob("*")
        if p.is_file() and p.suffix in FINGERPRINTED and "__pycache__" not in p.parts
    }
    return _fingerprint(files)


def wheel_fingerprint(wheel: Path) -> str:
    """`source_fingerprint` of the package inside a wheel (what the host will have once installed)."""
    with zipfile.ZipFile(wheel) as z:
        files = {
            n.removeprefix("armlab/"): z.read(n)
            for n in z.namelist()
            if n.startswith("armlab/") and Path(n).suffix in FINGERPRINTED
        }
    return _fingerprint(files)


def build_wheel(out_dir: Path) -> Path:
    """Build armlab's wheel from the source checkout this armlab was installed from (`pip install -e`).

    Built from a copy of the checkout so no `build/` dir (with stale files) is left in the tree.
    """
    root = PACKAGE_DIR.parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ArmlabError(
            f"armlab at {PACKAGE_DIR} is not a source checkout, so setup cannot build a wheel; pass --wheel FILE"
        )
    src = out_dir / "src-copy"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (root / name).is_file():
            shutil.copy2(root / name, src / name)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out_dir),
        str(src),
    ]
    p = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(out_dir.glob(f"armlab-{armlab.__version__}-*.whl"))
    if p.returncode != 0 or not wheels:
        last = (p.stderr.strip().splitlines() or ["no wheel produced"])[-1]
        raise ArmlabError(f"building armlab's wheel failed: {last}")
    return wheels[0]


_wheel_lock = threading.Lock()
_wheels: dict[str, Path] = {}


def local_wheel() -> Path:
    """This armlab's wheel, built once per process (hosts set up in parallel share it)."""
    fp = source_fingerprint()
    with _wheel_lock:
        if fp not in _wheels or not _wheels[fp].exists():
            out = Path(tempfile.mkdtemp(prefix="armlab-wheel-"))
            atexit.register(shutil.rmtree, out, True)
            _wheels[fp] = build_wheel(out)
        return _wheels[fp]


# Runs on the host with its interpreter: what armlab (if any) it has. Prints one JSON line.
_PROBE = (
    "import json\n"
    "try:\n"
    "    import armlab\n"
    "    from armlab.ops.setup import source_fingerprint\n"
    "    print(json.dumps({'version': armlab.__version__, 'source': source_fingerprint()}))\n"
    "except Exception as e:\n"
    "    print(json.dumps({'version': None, 'error': f'{type(e).__name__}: {e}',\n"
    "                      'missing': getattr(e, 'name', None)}))\n"
)


@dataclass(frozen=True)
class SetupResult:
    host: str
    python: str
    installed: bool  # False: the host already had this exact armlab
    info: dict[str, Any]

    def line(self) -> str:
        i = self.info
        gpus = plural(i["gpus"], "GPU") + (f" ({i['gpu_names'][0]})" if i.get("gpu_names") else "")
        what = "installed" if self.installed else "already up to date"
        return (
            f"{self.host}: armlab {i['armlab']} {what} | Python {i['python']} ({self.python}) | torch {i['torch']} "
            f"| CUDA {i['cuda'] or 'none'} | {gpus}"
        )


def venv_dir(python: str) -> str | None:
    """The venv a `<venv>/bin/python*` interpreter path belongs to, else None."""
    parts = python.rstrip("/").split("/")
    if len(parts) >= 3 and parts[-2] == "bin" and parts[-1].startswith("python"):
        return "/".join(parts[:-2])
    return None


def remote_probe(remote: Remote, python: str) -> dict[str, Any]:
    p = remote.run(f"{rpath(python)} -c {shlex.quote(_PROBE)}", check=False, timeout=120)
    if p.returncode != 0:
        return {"version": None, "error": "no interpreter"}
    return _last_json(p.stdout.decode(errors="replace"))


def _last_json(text: str) -> dict[str, Any]:
    import json

    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ArmlabError(f"unexpected output from the host (no JSON): {text.strip()[-200:]!r}")


def setup_host(
    remote: Remote,
    *,
    python: str | None = None,
    base_python: str = "python3",
    system_site_packages: bool = False,
    extras: tuple[str, ...] = (),
    no_deps: bool = False,
    force: bool = False,
    wheel: Path | None = None,
) -> SetupResult:
    """Make `python` on the host run this machine's armlab; report Python, torch, CUDA, GPUs."""
    python = python or DEFAULT_REMOTE_PYTHON
    want = {"version": armlab.__version__, "source": source_fingerprint()}
    have = remote_probe(remote, python)
    installed = False
    if force or {k: have.get(k) for k in want} != want:
        venv = venv_dir(python)
        exists = remote.run(f"test -x {rpath(python)}", check=False).returncode == 0
        if not exists:
            if venv is None:
                raise ArmlabError(
                    f"host {remote.name!r}: {python} does not exist; set python to a <venv>/bin/python path to have setup create it"
                )
            ver = remote.run(
                f"{base_python} -c 'import sys; print(*sys.version_info[:2])'",
                check=False,
                what=f"{base_python} --version",
            )
            major_minor = tuple(int(x) for x in ver.stdout.split()) if ver.returncode == 0 else ()
            if major_minor < (3, 11):
                found = ".".join(map(str, major_minor)) or "not found"
                raise ArmlabError(
                    f"host {remote.name!r}: {base_python} is {found}; armlab needs Python >= 3.11 (pass --base-python)"
                )
            flag = " --system-site-packages" if system_site_packages else ""
            console.print(f"{remote.name}: creating venv {venv}{flag}")
            remote.run(f"{base_python} -m venv{flag} {rpath(venv)}", what="creating the venv", timeout=600)
        whl = wheel or local_wheel()
        remote_whl = f"~/.armlab/wheels/{whl.name}"
        console.print(f"{remote.name}: copying {whl.name}")
        remote.put(whl, remote_whl)
        spec = rpath(remote_whl) if not extras else rpath(remote_whl) + shlex.quote(f"[{','.join(extras)}]")
        pip = f"{rpath(python)} -m pip install -q --disable-pip-version-check"
        console.print(
            f"{remote.name}: installing armlab {armlab.__version__}"
            + (f" [{','.join(extras)}]" if extras else "")
        )
        # --force-reinstall --no-deps replaces a same-version armlab with this build; deps come after.
        remote.run(
            f"{pip} --force-reinstall --no-deps {rpath(remote_whl)}", what="pip install armlab", timeout=1800
        )
        if not no_deps:
            remote.run(f"{pip} {spec}", what="pip install armlab's dependencies", timeout=3600)
        have = remote_probe(remote, python)
        want["source"] = wheel_fingerprint(whl)  # the tree may have changed since the probe above
        if {k: have.get(k) for k in want} != want:
            raise ArmlabError(not_importable(remote.name, python, have, no_deps=no_deps))
        installed = True
    info = remote_host_info(remote, python)
    return SetupResult(host=remote.name, python=python, installed=installed, info=info)


def not_importable(host: str, python: str, probe: dict[str, Any], no_deps: bool) -> str:
    """Why the freshly installed armlab does not import on the host, and what to do about it."""
    what = probe.get("error") or f"found {probe}"
    line = f"host {host!r}: armlab still not importable by {python} after install ({what})"
    if probe.get("missing"):
        if no_deps:
            return line + "; --no-deps left its dependencies out: rerun without --no-deps (or use --system-site-packages on a host that has them)"
        return line + f"; install {probe['missing']!r} into that environment, or rerun with --force"
    return line


def remote_host_info(remote: Remote, python: str) -> dict[str, Any]:
    code = "import json; from armlab.ops.doctor import host_info; print(json.dumps(host_info()))"
    p = remote.run(f"{rpath(python)} -c {shlex.quote(code)}", what="reading host info", timeout=300)
    return _last_json(p.stdout.decode(errors="replace"))
