"""The import rules of docs/ARCHITECTURE.md, checked on the source: every import statement in a
package (module level or inside a function) names only what that package may depend on."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level names it must never import (anywhere in the file)
FORBIDDEN = {
    "resbm": {"httpx", "urllib3", "requests", "fastapi", "starlette", "uvicorn", "boto3", "botocore", "bittensor",
              "bridge", "neurons", "drills", "scripts", "tests"},
    "protocol": {"torch", "fastapi", "starlette", "uvicorn", "boto3", "botocore",
                 "bridge", "neurons", "drills", "scripts", "tests"},
    "bridge": {"torch", "neurons", "drills", "scripts", "tests"},
    "neurons": {"bridge", "drills", "scripts", "tests", "fastapi", "boto3", "botocore"},
    "drills": {"bridge", "scripts", "tests"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level package names a file imports (absolute imports only; relative ones stay inside)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_architecture(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_roots(f) & FORBIDDEN[package]) for f in files}
    bad = {f: names for f, names in bad.items() if names}
    assert not bad, f"{package}/ imports what docs/ARCHITECTURE.md forbids: {bad}"


def test_the_checker_sees_function_level_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import httpx\n    from boto3.session import Session\n")
    assert {"httpx", "boto3"} <= imported_roots(src)


def test_test_modules_share_helpers_through_the_harness_not_each_other():
    """Helpers two test files need live in tests/harness/ (or conftest), never in a test_*.py."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for m in re.finditer(r"^\s*(?:from|import)\s+tests\.(test_\w+)", path.read_text(), re.M):
            offenders.append(f"{path.relative_to(ROOT)} imports tests.{m[1]}")
    assert offenders == []


@pytest.mark.parametrize("package", ["bridge", "neurons", "drills", "resbm", "scripts"])
def test_route_paths_are_written_only_in_the_route_table(package):
    """protocol/routes.py is the whole wire contract: no other shipped package spells a path."""
    hits = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/v1/"):
                hits.setdefault(str(f.relative_to(ROOT)), []).append(node.value)
    assert not hits, f"route paths outside protocol/routes.py: {hits}"
