"""A bridge process that never answers its health check in time is stopped before the error
reaches the test (scripts/local_bridge.py), so a loaded box does not pile up orphan bridges."""
from __future__ import annotations

import pytest

from scripts import local_bridge
from tests.servers import make_chain, tiny_run_config


@pytest.mark.parametrize("many", [False, True], ids=["one bridge", "a cluster"])
def test_a_bridge_that_misses_its_start_deadline_is_stopped(tmp_path, monkeypatch, many):
    spawned = []
    real = local_bridge._spawn
    monkeypatch.setattr(local_bridge, "_spawn", lambda *a: spawned.append(real(*a)) or spawned[-1])
    make_chain(tmp_path / "chain.db", miners=1, validators=0)
    with pytest.raises(TimeoutError, match="did not answer"):
        if many:  # a database URL nothing listens on: the bridges cannot be up within 0.01 s anyway
            local_bridge.start_bridges([tmp_path / "b0", tmp_path / "b1"], tiny_run_config(), tmp_path / "chain.db",
                                       None, "postgresql://nobody@127.0.0.1:1/none", timeout=0.01)
        else:
            local_bridge.start_bridge(tmp_path / "b", tiny_run_config(), tmp_path / "chain.db", None, timeout=0.01)
    assert spawned and len(spawned) == (2 if many else 1)
    assert all(p.poll() is not None for p in spawned), "a bridge was left running"
