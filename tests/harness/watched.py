"""Threads that run a neuron (a miner's or validator's `run_forever`) in a test: a crash is kept
with its traceback and raised in the test's thread as an AssertionError naming the thread, so a
dead neuron fails the test where it died instead of showing only as a run that stalls."""
from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Iterable

__all__ = ["WatchedThread", "raise_crashes"]


class WatchedThread(threading.Thread):
    """A daemon thread that records the exception its target raised (`error`, `trace`)."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        super().__init__(target=self._watch, name=name, daemon=True)
        self._work = target
        self.error: BaseException | None = None
        self.trace = ""

    def _watch(self) -> None:
        try:
            self._work()
        except BaseException as exc:  # noqa: BLE001 - kept for the test's thread to raise
            self.error, self.trace = exc, traceback.format_exc()

    def check(self) -> None:
        """Raise an AssertionError carrying the thread's traceback if its target crashed."""
        if self.error is not None:
            raise AssertionError(f"thread {self.name!r} crashed: {self.error!r}\n{self.trace}") from self.error


def raise_crashes(threads: Iterable[threading.Thread]) -> None:
    """`check()` every WatchedThread among `threads` (the first crash found is raised)."""
    for t in threads:
        if isinstance(t, WatchedThread):
            t.check()
