"""Preflight checks (`armlab doctor`): everything the playbook's "Common Failure Checks" found
by hand after a launch failed, checked before anything starts.

Each check is ok / warn / fail with a one-line fix. The same checks run on this machine or, via
`armlab doctor --json` over SSH, on each host of the experiment (see `armlab.ops.remote`).
Secrets are looked up, never printed: a check says *which* variable holds a token, not its value.
"""

from __future__ import annotations

import errno
import importlib.metadata
import importlib.util
import json
import netrc
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from armlab.spec import Experiment
from armlab.store import is_remote, probe, redact
from armlab.text import plural
from armlab.workdir import open_workdir, read_leases

Status = Literal["ok", "warn", "fail"]

# Packages the trainer and data pipeline import at run time (module name, distribution name).
# rustbpe and psutil are the ones the playbook found missing only after a launch had crashed.
REQUIRED = [
    ("torch", "torch"), ("numpy", "numpy"), ("pyarrow", "pyarrow"), ("pydantic", "pydantic"),
    ("typer", "typer"), ("rich", "rich"), ("xxhash", "xxhash"), ("zstandard", "zstandard"),
    ("tiktoken", "tiktoken"), ("rustbpe", "rustbpe"), ("psutil", "psutil"),
]  # fmt: skip

# W&B API keys of the `wandb_v1_...` form (86 characters) are accepted from wandb 0.22.3 on
# (wandb/wandb PR #10688, "support api keys longer than 40 chars"); older clients fail with
# "API key must be 40 characters long".
WANDB_V1_MIN = (0, 22, 3)
HF_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class DoctorReport:
    host: str
    info: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(c.status == "fail" for c in self.checks)

    def add(self, name: str, status: Status, detail: str, fix: str = "") -> None:
        self.checks.append(Check(name, status, detail, fix))

    def to_json(self) -> str:
        return json.dumps({"host": self.host, "info": self.info, "checks": [asdict(c) for c in self.checks]})

    @classmethod
    def from_json(cls, text: str) -> DoctorReport:
        d = json.loads(text)
        return cls(host=d["host"], info=d["info"], checks=[Check(**c) for c in d["checks"]])


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse_version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def host_info() -> dict[str, Any]:
    """What `armlab setup` reports and the checks below use: Python, armlab, torch, CUDA, GPUs."""
    import torch

    from armlab import __version__
    from armlab.ops.setup import source_fingerprint

    cuda = torch.cuda.is_available()
    n = torch.cuda.device_count() if cuda else 0
    return {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "armlab": __version__,
        "armlab_source": source_fingerprint(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": n,
        "gpu_names": [torch.cuda.get_device_name(i) for i in range(n)],
    }


# -- individual checks ------------------------------------------------------------------------------
def check_python(r: DoctorReport) -> None:
    v = sys.version_info
    if v >= (3, 11):
        r.add("python", "ok", f"Python {platform.python_version()} ({sys.executable})")
    else:
        r.add(
            "python", "fail", f"Python {platform.python_version()} is too old", "armlab needs Python >= 3.11"
        )


def check_packages(r: DoctorReport) -> None:
    missing = [dist for mod, dist in REQUIRED if importlib.util.find_spec(mod) is None]
    found = ", ".join(
        f"{d} {_version(d)}" for m, d in REQUIRED if d not in missing and d in ("torch", "pyarrow", "rustbpe")
    )
    if missing:
        r.add(
            "packages",
            "fail",
            f"missing: {', '.join(missing)}",
            f"pip install {' '.join(missing)} (or `armlab setup` the host)",
        )
    else:
        r.add("packages", "ok", f"all {len(REQUIRED)} runtime packages import ({found})")


def check_gpus(r: DoctorReport, device: str | None, num_gpus: int | None) -> None:
    have, torch_v = r.info["gpus"], r.info["torch"]
    if device == "cpu":
        r.add("gpus", "ok", f"CPU run requested; {plural(have, 'GPU')} visible")
    elif device == "cuda" and num_gpus:
        if not r.info["cuda_available"]:
            r.add(
                "gpus", "fail", f"arms ask for {plural(num_gpus, 'GPU')} but torch {torch_v} sees no CUDA device",
                "check `nvidia-smi`; install a CUDA build of torch (armlab setup --system-site-packages reuses the host's) or use --device cpu",
            )  # fmt: skip
        elif have < num_gpus:
            r.add(
                "gpus", "fail", f"arms ask for {plural(num_gpus, 'GPU')} but torch sees {have}",
                "lower num_gpus in [[hosts]] (or --num-gpus), or check CUDA_VISIBLE_DEVICES and `nvidia-smi`",
            )  # fmt: skip
        else:
            r.add(
                "gpus",
                "ok",
                f"{plural(have, 'GPU')} visible, {num_gpus} requested ({', '.join(sorted(set(r.info['gpu_names'])))})",
            )
    elif have:
        r.add(
            "gpus",
            "ok",
            f"{plural(have, 'GPU')} visible: {', '.join(sorted(set(r.info['gpu_names'])))} (CUDA {r.info['cuda']})",
        )
    else:
        r.add(
            "gpus",
            "warn",
            f"no GPU visible to torch {torch_v}; training would run on CPU",
            "fine for tests; on a GPU host check `nvidia-smi`",
        )


def _existing_parent(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _write_probe(d: Path) -> str | None:
    """None when a file can be created in `d`, or (if `d` does not exist yet) in the nearest dir
    that would hold it; else why not. Permission bits are not enough: a read-only mount, ACLs or
    root-squashed NFS all say no only when a write is tried."""
    target = _existing_parent(d)
    if not target.is_dir():
        return f"{target} is a file, not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".armlab-doctor-", suffix=".tmp", dir=target)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"cannot write in {target} ({e.strerror})"
    return None


def check_workdir(r: DoctorReport, exp: Experiment, arms: list[str]) -> bool:
    """Try a write in the workdir and in each arm's data dir (the lease) and runs dir; False when
    the workdir is not a directory at all (the checks that read it are then skipped)."""
    root = exp.workdir_path
    if root.exists() and not root.is_dir():
        r.add("workdir", "fail", f"{root} is a file, not a directory",
              "move the file, or set 'workdir' in the experiment file (or [[hosts]] workdir) to a directory")  # fmt: skip
        return False
    wd = open_workdir(exp, create=False)
    dirs = [root] + [d for a in arms for d in (wd.data_dir(a), wd.runs_dir(a))]
    problems = list(dict.fromkeys(p for p in map(_write_probe, dirs) if p))
    if problems:
        r.add("workdir", "fail", "; ".join(problems),
              "make it writable (chmod/chown, or remount read-write), or set 'workdir' in the experiment file "
              "(or [[hosts]] workdir) to a writable dir")  # fmt: skip
    else:
        r.add("workdir", "ok", f"writable: {root} and the arms' data and run dirs")
    return True


def disk_needed(exp: Experiment, arms: list[str]) -> int:
    """Rough bytes the arms still need: data not yet prepared plus two checkpoints per arm.

    Data: ~2 bytes of zstd parquet per training token (text is ~4.5 bytes/token, zstd ~2.3x).
    Checkpoints: fp32 weights + optimiser state, ~12 bytes per parameter, latest and final kept.
    """
    from armlab.train.engines import get_engine

    budget = get_engine(exp.train.engine).budget(exp, exp.tokenizer.vocab_size)
    wd = open_workdir(exp, create=False)
    need = 0
    for arm in arms:
        if not (wd.data_dir(arm) / "manifest.json").exists():
            need += 2 * budget.tokens
        need += 2 * 12 * budget.params.total
    return need


def check_disk(r: DoctorReport, exp: Experiment, arms: list[str]) -> None:
    where = _existing_parent(exp.workdir_path)
    free = shutil.disk_usage(where).free
    need = disk_needed(exp, arms)
    detail = f"{free / 1e9:,.1f} GB free at {where}, arms need about {need / 1e9:,.1f} GB"
    if free < need:
        r.add(
            "disk",
            "fail",
            detail,
            "free space, or point the experiment's workdir (or [[hosts]] workdir) at a bigger disk",
        )
    elif free < 1.5 * need:
        r.add("disk", "warn", detail + " (under 50% headroom)", "free some space before a long run")
    else:
        r.add("disk", "ok", detail)


def check_port(r: DoctorReport, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                r.add(
                    "master_port", "fail", f"port {port} is in use (another torchrun on this host?)",
                    "give each run on a host its own master_port in [[hosts]] (or --master-port), e.g. 29501",
                )  # fmt: skip
                return
            r.add("master_port", "warn", f"cannot probe port {port}: {e.strerror}")
            return
    r.add("master_port", "ok", f"port {port} is free")


def check_data(r: DoctorReport, exp: Experiment, arm: str, world_size: int, expect_data: bool) -> None:
    wd = open_workdir(exp, create=False)
    data_dir = wd.data_dir(arm)
    name = f"data {arm}"
    if not (data_dir / "manifest.json").exists():
        spec = exp.arm(arm)
        if not expect_data:
            r.add(name, "ok", f"not prepared yet: `armlab prepare` (or launch) will ({data_dir})")
        elif spec.kind == "prebuilt" and is_remote(spec.uri or ""):  # a store URL: fetched at launch
            if problem := probe(spec.uri or ""):
                r.add(name, "fail", f"not downloaded, and {problem}", "check the URL, credentials and network")
            else:
                r.add(name, "warn", f"not downloaded yet: {data_dir}", f"launch pulls it (armlab pull EXP --arm {arm})")
        else:
            r.add(
                name,
                "fail",
                f"not prepared: {data_dir}",
                f"armlab prepare EXP --arm {arm} on the host, or launch --prepare-mode prepare",
            )
        return
    try:
        from armlab.data.check import check_data_dir
    except ImportError:  # the data checker is not installed on this host: fall back to the manifest
        check_data_dir = None
    if check_data_dir is not None:
        res = check_data_dir(data_dir, world_size=world_size)
        if res.ok:
            r.add(name, "ok", f"complete, feeds {plural(world_size, 'rank')} ({data_dir})")
        else:
            r.add(
                name, "fail", f"{data_dir}: {res.problems[0]}", res.fix or "rerun armlab prepare for this arm"
            )
        return
    from armlab.workdir import read_json

    m = read_json(data_dir / "manifest.json")
    if m.get("complete"):
        r.add(
            name, "ok", f"complete: {plural(m.get('rows', 0), 'row')} in {plural(len(m.get('files', [])), 'file')} ({data_dir})"
        )
    else:
        r.add(
            name,
            "fail",
            f"{data_dir}: preparation did not finish",
            f"rerun armlab prepare EXP --arm {arm} (it resumes)",
        )


def check_shared_inputs(r: DoctorReport, exp: Experiment) -> None:
    """The eval set and tokenizer every arm shares (written by prepare and `armlab tokenizer`)."""
    wd = open_workdir(exp, create=False)
    missing = [
        what
        for what, p in (("eval set", wd.eval_dir), ("tokenizer", wd.tokenizer_dir))
        if not (p / "manifest.json").exists()
    ]
    if missing:
        r.add("shared inputs", "fail", f"{' and '.join(missing)} missing under {wd.root}",
              "armlab prepare EXP and armlab tokenizer EXP on the host, or launch --prepare-mode prepare")  # fmt: skip
    else:
        r.add("shared inputs", "ok", f"eval set and tokenizer present ({wd.root})")


def check_lease(r: DoctorReport, exp: Experiment, arm: str) -> None:
    """Read leases are shared, so another run reading the arm is no obstacle to a new run; a stale
    lease (its holder dead on this host) is taken over by the run it belongs to."""
    data_dir = open_workdir(exp, create=False).data_dir(arm)
    leases = read_leases(data_dir)
    name = f"lease {arm}"
    live = [x for x in leases if x.alive]
    stale = [x for x in leases if not x.alive]
    if not leases:
        r.add(name, "ok", "no run reads the data")
    elif stale:
        r.add(name, "warn", f"stale lease from dead {stale[0].describe()}", "rerunning that run takes it over")
    else:
        who = "; ".join(x.describe() for x in live)
        r.add(name, "ok", f"read by {plural(len(live), 'live run')} ({who}); runs share an arm, prepare waits")


def hf_token_source() -> str | None:
    """Name of the place an HF token comes from (never the token)."""
    for var in HF_TOKEN_VARS:
        if os.environ.get(var):
            return var
    try:
        from huggingface_hub import get_token

        if get_token():
            return "huggingface_hub login"
    except ImportError:
        pass
    return None


def check_hf(r: DoctorReport, exp: Experiment) -> None:
    uris = [exp.pool.uri] + [a.uri or "" for a in exp.arms]
    if not any(u.startswith("hf://") for u in uris):
        return
    src = hf_token_source()
    if src:
        r.add("hf token", "ok", f"set ({src}; value hidden)")
    else:
        r.add(
            "hf token", "warn", "pool is on the Hugging Face hub and no token is set: unauthenticated requests are rate-limited",
            "export HF_TOKEN=hf_... on the host (or `hf auth login`)",
        )  # fmt: skip


def check_bundle(r: DoctorReport, exp: Experiment) -> None:
    """The CORE eval bundle `armlab run` opens before it trains: off, a local dir, or a URL that is
    cached or answers now (the storage seam's probe: one HEAD, bounded by ARMLAB_NET_TIMEOUT).
    Offline with nothing cached is a fail: `run` would stop there (0.2's doctor called that "ready")."""
    from armlab.evaluate import bundle as core

    source = exp.evaluate.bundle
    name = "core bundle"
    if source is None:
        r.add(name, "ok", 'CORE off (evaluate.core_bundle = "none"): val bpb only')
    elif not is_remote(source):
        path = Path(source).expanduser()
        if (core.bundle_dir(path) / "core.yaml").is_file():
            r.add(name, "ok", f"local bundle {path}")
        else:
            r.add(name, "fail", f"{path}: no eval bundle there (no core.yaml)",
                  f"set evaluate.core_bundle to a bundle dir; {core.OFFLINE_FIX}")  # fmt: skip
    elif (hit := core.cached(source)) is not None:
        r.add(name, "ok", f"cached: {hit} (from {redact(source)})")
    elif (problem := core.probe(source)) is None:
        r.add(name, "ok", f"not cached; {redact(source)} answers: `armlab run` downloads it once")
    else:
        r.add(name, "fail", f"not cached, and {redact(source)} is {problem}: `armlab run` would stop there",
              core.OFFLINE_FIX)  # fmt: skip


def wandb_key() -> tuple[str | None, str]:
    """(key, where it came from): WANDB_API_KEY, else ~/.netrc's api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"], "WANDB_API_KEY"
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        auth = None
    if auth and auth[2]:
        return auth[2], "~/.netrc"
    return None, ""


def check_wandb(r: DoctorReport, exp: Experiment | None) -> None:
    project = exp.train.wandb_project if exp else None
    key, src = wandb_key()
    mode = os.environ.get("WANDB_MODE", "").lower()
    if not project and not key:
        r.add("wandb", "ok", "not used (no train.wandb_project)")
        return
    if mode in ("disabled", "offline", "dryrun"):
        r.add("wandb", "ok", f"WANDB_MODE={mode}: no key needed")
        return
    version = _version("wandb")
    if version is None:
        status: Status = "fail" if project else "warn"
        r.add("wandb", status, "train.wandb_project is set but wandb is not installed" if project else "a W&B key is set but wandb is not installed",
              "pip install 'wandb>=0.22.3'")  # fmt: skip
        return
    if key is None:
        r.add(
            "wandb",
            "fail",
            f"wandb {version}: No API key configured",
            "`wandb login` on the host, or export WANDB_API_KEY",
        )
        return
    if key.startswith("wandb_v1_"):
        if _parse_version(version) < WANDB_V1_MIN:
            need = ".".join(map(str, WANDB_V1_MIN))
            r.add(
                "wandb", "fail", f"the key in {src} is a new wandb_v1_ key; wandb {version} rejects it ('API key must be 40 characters long')",
                f"pip install -U 'wandb>={need}' on the host (v1 keys are supported from wandb {need})",
            )  # fmt: skip
        else:
            r.add("wandb", "ok", f"wandb {version}, wandb_v1_ key in {src} (value hidden)")
    elif len(key) != 40 and "-" not in key:  # legacy cloud keys are 40 chars; local servers prefix theirs
        r.add(
            "wandb",
            "fail",
            f"the key in {src} has {len(key)} characters, not a valid W&B key",
            "copy the key again from https://wandb.ai/authorize; `wandb login --relogin`",
        )
    else:
        r.add("wandb", "ok", f"wandb {version}, key in {src} (value hidden)")


def check_script(r: DoctorReport, path: Path) -> None:
    name = f"script {path.name}"
    try:
        raw = path.read_bytes()
    except OSError as e:
        r.add(name, "fail", f"{path}: cannot read ({e.strerror})", "pass an existing file to --script")
        return
    crlf = raw.count(b"\r\n")
    if crlf:
        r.add(name, "fail", f"{path} has Windows line endings ({plural(crlf, 'line')}): bash fails with '$'\\r': command not found'",
              f"sed -i 's/\\r$//' {path}")  # fmt: skip
    elif raw.startswith(b"#!") and not os.access(path, os.X_OK):
        r.add(name, "warn", f"{path} has a #! line but is not executable", f"chmod +x {path}")
    else:
        r.add(name, "ok", f"{path}: Unix line endings")


# -- the whole preflight -----------------------------------------------------------------------------
def run_doctor(
    exp: Experiment | None = None,
    *,
    arms: list[str] | None = None,
    device: str | None = None,
    num_gpus: int | None = None,
    nproc: int = 1,
    master_port: int | None = None,
    scripts: tuple[Path, ...] = (),
    nanochat: Path | None = None,
    expect_data: bool = True,
    bundle: bool = True,
) -> DoctorReport:
    """Run every check that applies on this machine (`expect_data`: the arms must be prepared;
    `bundle`: it will evaluate, so the CORE bundle must be at hand; a host `launch` trains on
    evaluates later and is not asked)."""
    from armlab.train.engines import get_engine
    from armlab.train.engines.nanochat import doctor_checkout

    info = host_info()
    r = DoctorReport(host=info["hostname"], info=info)
    check_python(r)
    check_packages(r)
    check_gpus(r, device, num_gpus)
    if exp is not None:
        arm_names = arms if arms is not None else [a.name for a in exp.arms]
        for a in arm_names:
            exp.arm(a)  # unknown arm: one-line error
        world = nproc if device == "cpu" else (num_gpus or max(info["gpus"], 1))
        if check_workdir(r, exp, arm_names):
            check_disk(r, exp, arm_names)
            if expect_data:
                check_shared_inputs(r, exp)
            for a in arm_names:
                check_data(r, exp, a, world, expect_data)
                check_lease(r, exp, a)
        if master_port is not None:
            check_port(r, master_port)
        check_hf(r, exp)
        if bundle:
            check_bundle(r, exp)
        get_engine(exp.train.engine).doctor_checks(r, exp)  # the engine's own checks
    check_wandb(r, exp)
    for s in scripts:
        check_script(r, Path(s))
    if nanochat is not None:  # a checkout named by hand (`doctor --nanochat DIR`), experiment or not
        doctor_checkout(r, str(nanochat), None, None)
    return r


def render(reports: list[DoctorReport], stderr: bool = False) -> None:
    """Every host's checks (stdout for `doctor`, whose result it is; stderr for `launch`): a table
    on a terminal, one plain line per check otherwise (a log or a pipe: nothing folded or coloured)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    multi = len(reports) > 1
    out = Console(highlight=False, stderr=stderr, width=max(shutil.get_terminal_size((160, 20)).columns, 160))
    fails = sum(c.status == "fail" for rep in reports for c in rep.checks)
    warns = sum(c.status == "warn" for rep in reports for c in rep.checks)
    summary = f"doctor: {fails} failed, {plural(warns, 'warning')}" + ("" if fails else ": ready")
    if not out.is_terminal:
        for rep in reports:
            for c in rep.checks:
                host = f"{rep.host}: " if multi else ""
                print(f"{host}{c.name}: {c.status}: {c.detail}" + (f" (fix: {c.fix})" if c.fix else ""), file=out.file)
        print(summary, file=out.file)
        return
    style = {"ok": "green", "warn": "yellow", "fail": "bold red"}
    table = Table(show_lines=False, pad_edge=False)
    if multi:
        table.add_column("host")
    for col in ("check", "", "detail", "fix"):
        table.add_column(col, overflow="fold")
    for rep in reports:
        for c in rep.checks:
            # escape: details and fixes are plain text ("[[hosts]] workdir"), never rich markup
            row = [escape(c.name), f"[{style[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix)]
            table.add_row(*([escape(rep.host)] if multi else []), *row)
    out.print(table)
    out.print(summary)
