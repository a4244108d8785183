"""The harness's WatchedThread turns a neuron thread's crash into a test failure that names the
thread and carries its traceback; a thread that ends normally raises nothing."""
from __future__ import annotations

import threading

import pytest

from tests.harness.watched import WatchedThread, raise_crashes


def _crash() -> None:
    raise RuntimeError("validator lost its state file")


def test_a_crashed_neuron_thread_fails_with_its_name_and_traceback():
    ok, dead = WatchedThread(lambda: None, "miner0"), WatchedThread(_crash, "validator")
    for t in (ok, dead):
        t.start()
        t.join(30)
    ok.check()
    with pytest.raises(AssertionError, match="'validator' crashed: RuntimeError") as err:
        raise_crashes([threading.Thread(target=lambda: None), ok, dead])
    assert "validator lost its state file" in str(err.value) and "_crash" in str(err.value)
