"""tests/conftest.py hands the costliest test files to the workers first: modules marked `slow`
before the rest, a larger declared timeout before a smaller one, file order otherwise, and tests
keep their order inside a module."""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")


def test_slow_modules_with_the_longest_timeouts_are_collected_first(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: end-to-end\n    timeout: limit\n")
    pytester.makepyfile(
        test_a_unit="def test_one(): pass\ndef test_two(): pass\n",
        test_b_slow_short="import pytest\npytestmark = [pytest.mark.slow, pytest.mark.timeout(100)]\n"
                          "def test_b(): pass\n",
        test_c_slow_long="import pytest\npytestmark = pytest.mark.slow\n"
                         "def test_first(): pass\n@pytest.mark.timeout(900)\ndef test_second(): pass\n",
        test_d_timeout_only="import pytest\n@pytest.mark.timeout(600)\ndef test_d(): pass\n",
        test_e_unit="def test_e(): pass\n",
    )
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in result.outlines if "::" in line]
    assert ids == ["test_c_slow_long.py::test_first", "test_c_slow_long.py::test_second",
                   "test_b_slow_short.py::test_b", "test_d_timeout_only.py::test_d",
                   "test_a_unit.py::test_one", "test_a_unit.py::test_two", "test_e_unit.py::test_e"], ids
