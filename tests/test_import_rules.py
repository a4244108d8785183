"""The import rules of docs/ARCHITECTURE.md, checked on the source and on a running bridge.

The allowlist is read from the doc's table ("Packages and what they may import"), so the doc and
the check cannot drift apart: every import statement of a package (module level or inside a
function, and `importlib.import_module` of a literal name) names the standard library, the
package itself or what its row allows. A fresh process that imports every bridge module and
builds the bridge's app for a sharded run must not load torch or resbm."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
CHECKED = ("spec", "resbm", "protocol", "bridge", "neurons", "drills")


def allowlist(doc: str) -> dict[str, set[str] | None]:
    """package -> the import names its row of the doc's table allows (None: everything)."""
    section = doc.split("## Packages and what they may import", 1)[1].split("\n## ", 1)[0]
    rules: dict[str, set[str] | None] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(\w+)/`", cells[0]) if len(cells) == 3 else None
        if m:
            rules[m[1]] = None if cells[2] == "everything" else set(re.findall(r"`(\w+)`", cells[2]))
    return rules


def imported_names(path: Path) -> set[str]:
    """Top-level names a file imports: absolute imports anywhere in it (relative ones stay inside
    the package) and literal `importlib.import_module("x")` / `__import__("x")` calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            names.add(node.args[0].value.split(".")[0])
    return names


RULES = allowlist(DOC.read_text())


def test_the_doc_states_a_rule_for_every_package():
    shipped = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"scripts"}
    assert shipped <= set(RULES), f"packages without a row in docs/ARCHITECTURE.md: {shipped - set(RULES)}"
    assert set(CHECKED) <= {p for p, allowed in RULES.items() if allowed is not None}
    assert RULES["scripts"] is None and RULES["tests"] is None


@pytest.mark.parametrize("package", CHECKED)
def test_package_imports_only_what_the_architecture_allows(package):
    allowed = RULES[package] | set(sys.stdlib_module_names) | {package}
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    bad = {str(f.relative_to(ROOT)): sorted(imported_names(f) - allowed) for f in files}
    bad = {f: names for f, names in bad.items() if names}
    assert not bad, f"{package}/ imports what docs/ARCHITECTURE.md does not allow it: {bad}"


def test_the_rules_keep_torch_out_of_the_bridge_and_the_network_out_of_resbm():
    """The doc's rows themselves: the properties the architecture promises hold in the table."""
    assert not {"torch", "resbm", "neurons", "drills", "safetensors"} & RULES["bridge"]
    assert not {"protocol", "bridge", "neurons", "drills", "httpx", "urllib3", "requests", "boto3"} & RULES["resbm"]
    assert not {"torch", "resbm", "protocol", "bridge", "neurons"} & RULES["spec"]
    assert "drills" not in RULES["neurons"] and "bridge" not in RULES["neurons"]


def test_the_checker_sees_every_kind_of_import(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import importlib\nfrom . import sibling\n"
                   "def f():\n    import httpx\n    from boto3.session import Session\n"
                   "    importlib.import_module('torch.nn')\n    __import__('resbm')\n")
    assert imported_names(src) == {"importlib", "httpx", "boto3", "torch", "resbm"}


def test_the_table_parser_reads_each_row(tmp_path):
    doc = ("## Packages and what they may import\n\n| package | owns | may import |\n|---|---|---|\n"
           "| `a/` | things, with `not_a_rule` inside | `x`, `y` (why) |\n| `b/` | more | everything |\n"
           "\n## Next\n| `c/` | elsewhere | `z` |\n")
    assert allowlist(doc) == {"a": {"x", "y"}, "b": None}


_BRIDGE_APP = """
import importlib, json, pkgutil, sys, tempfile
from pathlib import Path
import bridge
for m in pkgutil.iter_modules(bridge.__path__):
    importlib.import_module("bridge." + m.name)
from bittensor.sp_core import Keypair
from bridge.app import create_app
from bridge.settings import BridgeSettings, check_model
from protocol.chain import LocalChain
from protocol.messages import RunConfig
run = RunConfig(**json.loads(sys.argv[1]))
check_model(run, "run.yaml")
d = Path(tempfile.mkdtemp())
chain = LocalChain(d / "chain.db", 1)
chain.create_subnet(Keypair.create_from_uri("//owner"), max_uids=8)
app = create_app(BridgeSettings(run=run, db_path=str(d / "b.sqlite"), nonce_db_path=str(d / "n.sqlite")),
                 chain, None, Keypair.create_from_uri("//bridge"))
assert app.state.service is not None
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "resbm", "safetensors"))))
"""


def test_the_bridge_app_starts_without_loading_torch_or_resbm(tmp_path):
    """Every bridge module imported and the app built for a sharded run (code sizes, sync piece
    and update sizes, model check): in a fresh interpreter, none of torch, resbm, safetensors."""
    from tests.servers import tiny_run_config
    run = tiny_run_config(sync_mode="sharded", sync_shards=2, sync_codec="int8", sync_block=64)
    proc = subprocess.run([sys.executable, "-c", _BRIDGE_APP, json.dumps(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_test_modules_share_helpers_through_the_harness_not_each_other():
    """Helpers two test files need live in tests/harness/ (or conftest), never in a test_*.py."""
    offenders = []
    for path in (ROOT / "tests").rglob("*.py"):
        for m in re.finditer(r"^\s*(?:from|import)\s+tests\.(test_\w+)", path.read_text(), re.M):
            offenders.append(f"{path.relative_to(ROOT)} imports tests.{m[1]}")
    assert offenders == []


@pytest.mark.parametrize("package", ["bridge", "neurons", "drills", "resbm", "scripts", "spec"])
def test_route_paths_are_written_only_in_the_route_table(package):
    """protocol/routes.py is the whole wire contract: no other shipped package spells a path."""
    hits = {}
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/v1/"):
                hits.setdefault(str(f.relative_to(ROOT)), []).append(node.value)
    assert not hits, f"route paths outside protocol/routes.py: {hits}"
