"""No import cycle anywhere in the project's packages: a module that imports another (at module
level or inside a function, where a cycle is usually hidden) is never imported back by it,
directly or through others. Modules that need each other are one module, or share a third."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bridge", "neurons", "protocol", "resbm", "spec", "drills", "scripts")


def _module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.AST, here: str, modules: set[str]) -> set[str]:
    """Project modules an import statement loads (`from pkg import mod` counts as pkg.mod)."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = here.split(".")[: len(here.split(".")) - node.level]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" for a in node.names] + [base]
    out = set()
    for n in names:
        while n and n not in modules:
            n = n.rpartition(".")[0]
        if n and n != here and n.split(".")[0] in PACKAGES and "." in n:
            out.add(n)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """{module: project modules it imports anywhere in its file} (packages' __init__ excluded)."""
    files = {_module_of(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    return {m: {t for node in ast.walk(ast.parse(p.read_text(), str(p))) for t in _targets(node, m, modules)}
            for m, p in files.items() if not p.name == "__init__.py"}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_module_of_the_project_imports_itself_through_others():
    found = cycles(import_graph())
    assert found == [], f"import cycles (module-level or inside functions): {found}"


def test_the_checker_finds_a_cycle_hidden_in_a_function_and_a_relative_import(tmp_path):
    pkg = tmp_path / "bridge"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from bridge import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import x\n")
    (pkg / "c.py").write_text("import bridge.a\nx = 1\n")
    (pkg / "d.py").write_text("from bridge.a import b\n")
    graph = import_graph(tmp_path)
    assert graph["bridge.b"] == {"bridge.c"} and graph["bridge.d"] == {"bridge.a"}
    assert cycles(graph) == [["bridge.a", "bridge.b", "bridge.c"]]
