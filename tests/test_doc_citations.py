"""Every test the docs cite exists: `tests/test_x.py::test_name` (or `test_x.py::...`, and a
following `::test_name` in the same table cell or sentence meaning the same file) names a file of
tests/ that defines that function, a cited parametrize id `[...]` names a parametrized test, and a
bare `test_name` in backticks is defined somewhere under tests/."""
from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
_CITE = re.compile(r"(?:tests/)?(?:(test_\w+)\.py)?::(test_\w+)(\[[^\]`]*\])?")


@cache
def defined_tests(path: Path) -> dict[str, bool]:
    """Test function name -> whether it is parametrized, for one test module."""
    out: dict[str, bool] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
            out[node.name] = any("parametrize" in ast.unparse(d) for d in node.decorator_list)
    return out


@cache
def all_test_names() -> frozenset[str]:
    """Every test function defined under tests/."""
    return frozenset(n for p in (ROOT / "tests").rglob("test_*.py") for n in defined_tests(p))


def citations(text: str) -> list[tuple[str, str, str]]:
    """(file, test, param id) of every `file.py::test` citation; `::test` reuses the last file of its line."""
    out = []
    for line in text.splitlines():
        last = None
        for m in _CITE.finditer(line):
            last = m[1] or last
            out.append((last or "", m[2], m[3] or ""))
    return out


def broken(doc: Path) -> list[str]:
    """What `doc` cites that does not exist."""
    text, bad = doc.read_text(), []
    for file, name, param in citations(text):
        path = ROOT / "tests" / f"{file}.py"
        if not file or not path.is_file():
            bad.append(f"{file or '?'}.py::{name} (no such test file)")
        elif name not in defined_tests(path):
            bad.append(f"{file}.py::{name} (no such test)")
        elif param and not defined_tests(path)[name]:
            bad.append(f"{file}.py::{name}{param} (the test is not parametrized)")
    for name in set(re.findall(r"`(test_\w+)`", text)) - all_test_names():
        if not (ROOT / "tests" / f"{name}.py").is_file():  # a module named in backticks is fine
            bad.append(f"{name} (defined nowhere under tests/)")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_test_a_doc_cites_exists(doc):
    assert broken(doc) == []


def test_the_checker_catches_renamed_tests_files_and_parameters(tmp_path):
    real = "test_the_checker_catches_renamed_tests_files_and_parameters"
    doc = tmp_path / "x.md"
    doc.write_text(f"| a | `tests/test_doc_citations.py::{real}`, `::test_gone` |\n"
                   f"`test_nowhere.py::test_a` and `test_doc_citations.py::{real}[p]` and `test_never_defined`\n")
    assert sorted(broken(doc)) == sorted([
        "test_doc_citations.py::test_gone (no such test)", "test_nowhere.py::test_a (no such test file)",
        f"test_doc_citations.py::{real}[p] (the test is not parametrized)",
        "test_never_defined (defined nowhere under tests/)"])
