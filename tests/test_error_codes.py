"""Every refusal code the bridge raises has one HTTP status in protocol.errors' table."""
from __future__ import annotations

import ast
from pathlib import Path

import bridge
from bridge.records import TransitionError
from protocol.errors import ERROR_STATUS, http_status, retry_after


def _raised_codes() -> dict[str, str]:
    """code -> file:line of each `TransitionError("code", ...)` in the bridge package."""
    out = {}
    for path in sorted(Path(bridge.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "TransitionError":
                first = node.args[0]
                assert isinstance(first, ast.Constant) and isinstance(first.value, str), \
                    f"{path.name}:{node.lineno}: the code must be a string literal"
                out[first.value] = f"{path.name}:{node.lineno}"
    return out


def test_every_raised_code_is_in_the_table():
    raised = _raised_codes()
    assert len(raised) > 25  # the scan found the bridge's refusals
    missing = {c: where for c, where in raised.items() if c not in ERROR_STATUS}
    assert not missing, f"codes without an HTTP status in protocol/errors.py: {missing}"


def test_refusals_map_to_their_statuses_and_unknown_codes_to_500():
    assert [http_status(c) for c in ("bad_size", "unknown_hop", "not_leased", "body_too_large",
                                     "rate_limited", "storage_error")] == [400, 404, 409, 413,
                                                                            429, 503]
    assert http_status("no_such_code") == 500 and retry_after("no_such_code") is None
    assert retry_after("not_leased") == 1.0 and retry_after("bad_size") is None
    err = TransitionError("expired", "lease of hop h0x1 expired")
    assert (err.code, err.message, str(err)) == ("expired", "lease of hop h0x1 expired",
                                                 "lease of hop h0x1 expired")
    assert not hasattr(err, "status")  # transport-free: the web layer owns the status
