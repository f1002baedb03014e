"""The package's import graph (scripts/import_graph.py, from the source): no cycles, the core
imports neither train nor ops, and `armlab run` (pipeline) reaches ops only through the
orchestrator."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"


def load():
    spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["import_graph"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_no_cycles_and_layers_hold(tmp_path: Path) -> None:
    ig = load()
    g = ig.graph()
    assert ig.cycles(g) == []
    for core in ("armlab.spec", "armlab.workdir", "armlab.errors", "armlab.records", "armlab.runs"):
        assert not {m for m in g[core] if m.startswith(("armlab.train", "armlab.ops"))}, core
    assert {m for m in g["armlab.pipeline"] if m.startswith("armlab.ops")} == {"armlab.ops.orchestrator"}
    # the host side never imports the orchestrator that drives it
    assert not {m for m in g["armlab.ops.hosts.agent"] if m == "armlab.ops.orchestrator"}
    # and the detector finds a cycle when there is one (a lazy import counts)
    pkg = tmp_path / "armlab"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from armlab import b\n")
    (pkg / "b.py").write_text("def f():\n    from armlab.a import x\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from armlab import a\n")
    assert ig.cycles(ig.graph(tmp_path)) == [["armlab.a", "armlab.b"]]
