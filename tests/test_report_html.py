"""report.html in a real browser (headless Chromium): every embedded figure decodes, the tables
and sections are there, the verdict reads as on the terminal."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from armlab.report.compare import compare
from results_util import make_run, tiny_experiment

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => [i.alt, i.naturalWidth, i.naturalHeight]);
  const h2 = [...document.querySelectorAll('h2')].map(h => h.textContent);
  const verdict = [...document.querySelectorAll('li')].map(li => li.innerText);
  const pre = document.createElement('pre');
  pre.id = 'armlab-check';
  pre.textContent = JSON.stringify({imgs, h2, verdict, tables: document.querySelectorAll('table').length,
                                    code: document.querySelectorAll('code').length});
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    return exe


def rendered(page: Path) -> dict:
    """The page as the browser built it: what CHECK found once every image had loaded."""
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    p = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    m = re.search(r'<pre id="armlab-check">(.*?)</pre>', p.stdout, re.S)
    assert m, p.stderr[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))


def test_the_report_page_renders_every_figure_and_the_verdict(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    exp = tiny_experiment(tmp_path / "wd", seeds=[0, 1, 2])
    nbytes = rng.integers(200, 900, 60).astype(float)
    for s in (0, 1, 2):
        for arm, eff in (("top", -0.05), ("random", 0.0)):
            rate = (1 + eff) * (1 + rng.normal(0, 0.01)) * rng.uniform(0.9, 1.1, 60)
            make_run(exp, arm, s, bpb=0.0, per_doc=((rate * nbytes).tolist(), nbytes.tolist()),
                     core_tasks={"t1": {"correct": (rng.random(40) < 0.6 + 0.1 * (arm == "top")).astype(int).tolist(),
                                        "random_baseline": 25.0}})  # fmt: skip
    out, summary = compare(exp)
    got = rendered(out / "report.html")
    assert {alt for alt, *_ in got["imgs"]} >= {"differences", "final", "curves", "core_tasks"}
    assert all(w > 300 and h > 150 for _, w, h in got["imgs"]), got["imgs"]  # every PNG decoded
    assert got["h2"][:3] == ["Verdict", "Differences against the reference arm", "Arms (mean over seeds [95% CI])"]
    assert got["tables"] >= 4 and got["code"] >= 2  # markdown `code` shows as code, not backticks
    assert summary.verdict[0] in got["verdict"]
