"""The TF32 API clash in a nanochat checkout (a check for the nanochat engine's `doctor_checks`).

TF32 settings: the legacy API (allow_tf32 flags, set_float32_matmul_precision, the cuBLAS
override variable) and the new per-backend `fp32_precision` API (torch >= 2.9). Code that sets
both makes torch.compile/inductor raise "you have used mix of the legacy and new APIs to set
the TF32 status"; that crash is what the playbook's patch_nanochat.py worked around.
armlab's own trainer sets neither, so only a checkout is checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from armlab.train.engines import CheckReport

TF32_LEGACY = re.compile(r"allow_tf32\s*=(?!=)|set_float32_matmul_precision\s*\(")
TF32_NEW = re.compile(r"fp32_precision\s*=(?!=)")


def tf32_settings(root: Path) -> tuple[list[str], list[str]]:
    """(legacy, new) TF32 setting sites `file:line` in the Python files under `root`."""
    legacy: list[str] = []
    new: list[str] = []
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts)
    for f in files:
        try:
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines, 1):
            code = line.split("#", 1)[0]
            site = f"{f.relative_to(root) if root.is_dir() else f.name}:{i}"
            if TF32_LEGACY.search(code):
                legacy.append(site)
            if TF32_NEW.search(code):
                new.append(site)
    return legacy, new


def check_tf32(report: CheckReport, checkout: Path) -> None:
    """Mixed legacy/new TF32 settings in a nanochat checkout (or the environment it runs in)."""
    if not checkout.is_dir():
        report.add("tf32", "fail", f"{checkout}: not a directory", "pass the nanochat checkout's root")
        return
    legacy, new = tf32_settings(checkout)
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") and new:
        legacy = ["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE (environment)", *legacy]
    if legacy and new:
        report.add(
            "tf32", "fail",
            f"nanochat {checkout} sets TF32 with both the legacy API ({', '.join(legacy[:3])}) and the new "
            f"fp32_precision API ({', '.join(new[:3])}): torch.compile fails with 'mix of the legacy and new APIs "
            "to set the TF32 status'",
            "use one API: replace the legacy lines with torch.backends.cuda.matmul.fp32_precision = 'tf32' "
            "(and cudnn.conv), or unset TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
        )  # fmt: skip
    else:
        report.add("tf32", "ok", f"one TF32 API in use (checked {checkout})")
