"""`armlab doctor` on this machine: each check fails (or warns) on the real fault it guards against.

Every test runs the real CLI in a subprocess (`armlab doctor ... --json`) so the exit code and the
JSON contract that `launch` reads over SSH are what is tested. Secrets set in the environment
must never appear in the output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from armlab.workdir import open_workdir

HF_SECRET = "hf_SECRETtokenVALUE1234567890"
WANDB_V1_SECRET = "wandb_v1_" + "Q" * 77  # the new 86-character form


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict, str]:
    """The real `armlab doctor ... --json` command, in-process (torch is imported once per session)."""
    from typer.testing import CliRunner

    from armlab.cli import app

    result = CliRunner().invoke(app, ["doctor", *args, "--json"], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    out = result.stdout.strip().splitlines()
    assert out, f"no JSON from doctor: {result.output}"
    return result.exit_code, json.loads(out[-1]), result.output


def checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["checks"]}


def write_exp(tmp_path: Path, pool: str = "/nonexistent/pool", train: str = "", name: str = "doc") -> Path:
    p = tmp_path / "exp.toml"
    p.write_text(
        f'name = "{name}"\nworkdir = "{tmp_path / "work"}"\n[pool]\nuri = "{pool}"\n'
        '[[arms]]\nname = "rand"\nkind = "random"\nratio = 0.5\n'
        '[evaluate]\ncore_bundle = "none"\n'  # doctor checks the bundle; DCLM's default is online
        f"[model]\ndepth = 2\nmax_seq_len = 64\n[tokenizer]\nvocab_size = 400\n[train]\nnum_iterations = 10\n{train}"
    )
    return p


def test_machine_checks_pass_without_experiment():
    rc, rep, _ = doctor()
    c = checks(rep)
    assert rc == 0
    assert c["python"]["status"] == "ok" and c["packages"]["status"] == "ok"
    assert rep["info"]["torch"] and rep["info"]["gpus"] == 0


def test_crlf_script_fails_with_sed_fix(tmp_path: Path):
    bad = tmp_path / "run_experiment_arm.sh"
    bad.write_bytes(b"#!/bin/bash\r\necho hi\r\ntorchrun x\r\n")
    good = tmp_path / "good.sh"
    good.write_bytes(b"#!/bin/bash\necho hi\n")
    good.chmod(0o755)
    rc, rep, _ = doctor("--script", str(bad), "--script", str(good))
    c = checks(rep)
    assert rc == 2
    assert c["script run_experiment_arm.sh"]["status"] == "fail"
    assert "3 lines" in c["script run_experiment_arm.sh"]["detail"]
    assert c["script run_experiment_arm.sh"]["fix"] == f"sed -i 's/\\r$//' {bad}"
    assert c["script good.sh"]["status"] == "ok"


def test_tf32_mixed_legacy_and_new_api_in_nanochat(tmp_path: Path):
    nc = tmp_path / "nanochat"
    (nc / "nanochat").mkdir(parents=True)
    (nc / "nanochat" / "common.py").write_text(
        "import torch\ntorch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
    )
    (nc / "scripts").mkdir()
    (nc / "scripts" / "base_train.py").write_text(
        "import torch\n# allow_tf32 = False (comment)\ntorch.backends.cuda.matmul.allow_tf32 = True\n"
    )
    rc, rep, _ = doctor("--nanochat", str(nc))
    tf = checks(rep)["tf32"]
    assert rc == 2 and tf["status"] == "fail"
    assert "scripts/base_train.py:3" in tf["detail"] and "nanochat/common.py:2" in tf["detail"]
    assert "fp32_precision" in tf["fix"]
    # After the patch (one API only) the same checkout passes the TF32 check (this stub's
    # base_train has no --help, so its own check fails: real checkouts in test_train_engines_nanochat)
    (nc / "scripts" / "base_train.py").write_text("import torch\n")
    rc, rep, _ = doctor("--nanochat", str(nc))
    assert checks(rep)["tf32"]["status"] == "ok" and checks(rep)["nanochat base_train"]["status"] == "fail"
    # The legacy environment override clashes with code that uses the new API.
    rc, rep, _ = doctor("--nanochat", str(nc), env={"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"})
    assert rc == 2 and "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" in checks(rep)["tf32"]["detail"]


def test_hf_token_warns_when_missing_and_is_never_printed(tmp_path: Path):
    exp = write_exp(tmp_path, pool="hf://datasets/org/name/data/*.parquet")
    clean = {k: "" for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")}
    clean["HF_HOME"] = str(tmp_path / "hf-home")  # no stored login
    _, rep, _ = doctor(str(exp), "--no-expect-data", env=clean)
    assert checks(rep)["hf token"]["status"] == "warn"
    _, rep, text = doctor(str(exp), "--no-expect-data", env={**clean, "HF_TOKEN": HF_SECRET})
    assert checks(rep)["hf token"]["status"] == "ok" and "HF_TOKEN" in checks(rep)["hf token"]["detail"]
    assert HF_SECRET not in text


def _fake_dist(root: Path, name: str, version: str) -> Path:
    """A real installed-distribution record (what pip writes) so importlib.metadata finds it."""
    d = root / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


def test_wandb_v1_key_needs_wandb_0_22_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    exp = write_exp(tmp_path, train='wandb_project = "armlab"\n')
    old = _fake_dist(tmp_path / "old", "wandb", "0.21.3")
    new = _fake_dist(tmp_path / "new", "wandb", "0.22.3")
    base = {"WANDB_MODE": "online", "HOME": str(tmp_path)}  # HOME: no ~/.netrc key
    monkeypatch.syspath_prepend(str(old))
    rc, rep, _ = doctor(str(exp), "--no-expect-data", env={**base, "WANDB_API_KEY": ""})
    assert rc == 2 and "No API key configured" in checks(rep)["wandb"]["detail"]
    rc, rep, text = doctor(str(exp), "--no-expect-data", env={**base, "WANDB_API_KEY": WANDB_V1_SECRET})
    w = checks(rep)["wandb"]
    assert rc == 2 and w["status"] == "fail" and "0.21.3" in w["detail"] and "wandb>=0.22.3" in w["fix"]
    assert WANDB_V1_SECRET not in text
    monkeypatch.syspath_prepend(str(new))
    rc, rep, text = doctor(str(exp), "--no-expect-data", env={**base, "WANDB_API_KEY": WANDB_V1_SECRET})
    assert checks(rep)["wandb"]["status"] == "ok" and WANDB_V1_SECRET not in text


def test_busy_master_port_fails(tmp_path: Path):
    exp = write_exp(tmp_path)
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, rep, _ = doctor(str(exp), "--no-expect-data", "--master-port", str(port))
        assert rc == 2 and checks(rep)["master_port"]["status"] == "fail"
        assert "29501" in checks(rep)["master_port"]["fix"]
    rc, rep, _ = doctor(str(exp), "--no-expect-data", "--master-port", str(port))
    assert checks(rep)["master_port"]["status"] == "ok"


def test_unprepared_arm_leased_data_and_gpus(tmp_path: Path):
    from armlab.spec import load_experiment
    from armlab.workdir import acquire_lease

    exp_path = write_exp(tmp_path)
    rc, rep, _ = doctor(str(exp_path))
    c = checks(rep)
    assert rc == 2
    assert c["data rand"]["status"] == "fail" and "armlab prepare" in c["data rand"]["fix"]
    assert c["shared inputs"]["status"] == "fail"
    # A live run's read lease on the arm's data is reported, and is no obstacle (leases are shared).
    data_dir = open_workdir(load_experiment(exp_path)).data_dir("rand")
    data_dir.mkdir(parents=True)
    acquire_lease(data_dir, "rand-s0")
    rc, rep, _ = doctor(str(exp_path), "--no-expect-data")
    assert (
        checks(rep)["lease rand"]["status"] == "ok"
        and str(os.getpid()) in checks(rep)["lease rand"]["detail"]
    )
    # More GPUs than this (GPU-less) machine has.
    rc, rep, _ = doctor(str(exp_path), "--no-expect-data", "--device", "cuda", "--num-gpus", "8")
    assert (
        rc == 2 and checks(rep)["gpus"]["status"] == "fail" and "--device cpu" in checks(rep)["gpus"]["fix"]
    )


def test_disk_need_exceeds_free(tmp_path: Path):
    exp = write_exp(tmp_path, train="")
    text = exp.read_text().replace("num_iterations = 10", "tokens = 1_000_000_000_000_000")
    exp.write_text(text)
    rc, rep, _ = doctor(str(exp), "--no-expect-data")
    d = checks(rep)["disk"]
    assert rc == 2 and d["status"] == "fail" and "GB free" in d["detail"]


@pytest.mark.parametrize("args", [["/no/such/exp.toml"], ["--arm", "nope"]])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str]):
    if args[0] == "--arm":
        args = [str(write_exp(tmp_path)), *args]
    p = subprocess.run(["armlab", "doctor", *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
