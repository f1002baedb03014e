#!/usr/bin/env python
"""The import graph of `src/armlab`, from the source (ast): every `import` of an armlab module,
at the top of a file or inside a function (a lazy import is still a dependency), except those
under `if TYPE_CHECKING:`. Prints the cycles (strongly connected components of more than one
module), and what a module imports (`--of armlab.pipeline`); `--dot` writes Graphviz.

    python scripts/import_graph.py                      # cycles, and a summary
    python scripts/import_graph.py --of armlab.pipeline # one module's armlab imports
    python scripts/import_graph.py --dot > armlab.dot

Exit 1 when there is a cycle (the test suite runs it: tests/test_import_graph.py).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the armlab package: dotted name -> file (`pkg/__init__.py` is `pkg`)."""
    out = {}
    for path in sorted((src / "armlab").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The armlab modules `name` imports at run time."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.add(_resolve(alias.name, known))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from package upwards
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else _resolve(base, known))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in out if m in known and m != name}


def _resolve(dotted: str, known: dict[str, Path]) -> str:
    """The longest known module prefix of `dotted` (`armlab.ops.hosts.Host` -> `armlab.ops.hosts`)."""
    parts = dotted.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def graph(src: Path = SRC) -> dict[str, set[str]]:
    known = modules(src)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            strong(v)
    return sorted(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--of", help="print the armlab modules this one imports")
    ap.add_argument("--dot", action="store_true", help="write the graph in Graphviz dot")
    ap.add_argument("--src", type=Path, default=SRC, help="the source dir holding armlab/ (default: this checkout's)")
    args = ap.parse_args(argv)
    g = graph(args.src)
    if args.dot:
        print("digraph armlab {")
        for a in sorted(g):
            for b in sorted(g[a]):
                print(f'  "{a}" -> "{b}";')
        print("}")
        return 0
    if args.of:
        for m in sorted(g.get(args.of, ())):
            print(m)
        return 0
    found = cycles(g)
    edges = sum(len(v) for v in g.values())
    print(f"{len(g)} modules, {edges} imports, {len(found)} cycle(s)")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
