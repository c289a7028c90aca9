"""The house keeps its layers: import-linter's contract holds, no pstage modules import each
other in a cycle, counting imports inside functions (they run too, only later), and every import
inside a function says why it is there (a heavy dependency kept off a fast path, an optional extra)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """pstage module -> the pstage modules it imports, at any depth of the file."""
    files = {module_name(p): p for p in (SRC / "pstage").rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                    )
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                # the longest pstage module the name refers to (a module, or a name inside one)
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "pstage":
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_at_any_depth():
    graph = import_graph()
    assert len(graph) > 40  # the walk found the package
    assert "pstage.data.prepare" in graph["pstage.training.train"]  # it sees imports (also inside functions)
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def unexplained_imports(root: Path) -> list[str]:
    """``file:line`` of each import inside a function with no comment on its lines or on the line above.

    Imports belong at the top of the module; one inside a function must say why it waits (docs/architecture.md).
    """
    found = []
    for path in sorted(root.rglob("*.py")):
        with path.open("rb") as f:
            comments = {t.start[0] for t in tokenize.tokenize(f.readline) if t.type == tokenize.COMMENT}
        lines = path.read_text().splitlines()
        nodes = {
            node
            for fn in ast.walk(ast.parse(path.read_text()))
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(fn)
            if isinstance(node, ast.Import | ast.ImportFrom)
        }
        for node in sorted(nodes, key=lambda n: n.lineno):
            own = comments.intersection(range(node.lineno, (node.end_lineno or node.lineno) + 1))
            above = node.lineno - 1 in comments and lines[node.lineno - 2].lstrip().startswith("#")
            if not own and not above:
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return found


def test_imports_inside_functions_say_why():
    assert unexplained_imports(SRC / "pstage") == []


def test_unexplained_import_finder(tmp_path: Path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text(
        "import os\n"
        "def f():\n"
        "    import json\n"
        "    import torch  # deferred: keeps torch off --help\n"
        "    # deferred: the extra\n"
        "    from x import (\n"
        "        y,\n"
        "    )\n"
        "    s = '# not a comment'; import re\n"
        "    def g():\n"
        "        import csv\n"
    )
    assert unexplained_imports(pkg) == [  # a '#' inside a string is no comment; nested functions count
        "pkg/m.py:3: import json",
        "pkg/m.py:9: s = '# not a comment'; import re",
        "pkg/m.py:11: import csv",
    ]


def test_layers_contract_kept():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is not installed: `make venv` installs the dev extra (import-linter)")
    out = subprocess.run([lint], capture_output=True, text=True, cwd=SRC.parent, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken" in out.stdout
