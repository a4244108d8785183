"""Where a miner's wall time goes: its main loop's time split into activities that sum to the wall
time, plus the busy seconds of the background threads that overlap it (encode, upload, report).

The main loop does one thing at a time, so each span it times is exclusive; whatever no span
covers (loop overhead, status lines) is `other`. Background work (uploading a hop's output and
reporting it done, which includes the bridge sealing the upload) runs while the main loop computes
the next hop, so it is booked apart: it costs the miner wall time only where the main loop waits
for it (`drain`).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["MAIN_ACTIVITIES", "BACKGROUND_ACTIVITIES", "IN_ROUND", "TimeBook", "hop_wall_ratio"]

# What the main loop can be doing, in the order a table prints them.
MAIN_ACTIVITIES = (
    "setup",      # registering, loading or catching up the round's weights
    "lease",      # a lease round trip that brought work (or a step / merge answer)
    "wait_work",  # parked at the bridge with step quota left: upstream stages have not sent work yet
    "download",   # waiting for a hop's inputs (what the prefetch did not hide)
    "compute",    # running the hop (hop_exec.run_hop)
    "drain",      # waiting for uploads and reports still in flight (bounded queue, before a step or merge)
    "barrier",    # the step quota is used: waiting for this inner step's last backwards to come back
    "step",       # the inner optimizer step and its report
    "merge",      # the round's sync (pseudo-gradient up, merge, votes, apply) and waiting for other stages
)
BACKGROUND_ACTIVITIES = ("encode", "upload", "report")  # report = hops/done, the bridge's seal included
# Activities that belong to serving hops inside a round (setup, merge and the rest are outside).
IN_ROUND = ("lease", "wait_work", "download", "compute", "drain", "barrier", "step")


class TimeBook:
    """Seconds per activity of the main loop (exclusive) and of the background threads (overlapping)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.main = dict.fromkeys(MAIN_ACTIVITIES, 0.0)
        self.background = dict.fromkeys(BACKGROUND_ACTIVITIES, 0.0)
        self.counts = dict.fromkeys(MAIN_ACTIVITIES + BACKGROUND_ACTIVITIES, 0)
        self._lock = threading.Lock()

    def add(self, activity: str, seconds: float) -> None:
        """Book `seconds` of `activity` (main or background, by its name)."""
        book = self.main if activity in self.main else self.background
        if activity not in book:
            raise KeyError(f"unknown activity {activity!r}")
        with self._lock:
            book[activity] += max(0.0, seconds)
            self.counts[activity] += 1

    @contextmanager
    def timed(self, activity: str) -> Iterator[None]:
        """Book the time the block takes as `activity`."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(activity, self.clock() - t0)

    def summary(self) -> dict:
        """{'wall', 'main': {activity: s, 'other': s}, 'background': {...}, 'counts': {...}}."""
        with self._lock:
            wall = max(0.0, self.clock() - self.started)
            main = dict(self.main)
            background = dict(self.background)
            counts = dict(self.counts)
        main["other"] = max(0.0, wall - sum(main.values()))
        return {"wall": wall, "main": main, "background": background, "counts": counts}


def hop_wall_ratio(main: dict) -> float | None:
    """A hop's wall time over its compute: the in-round seconds per hop (compute and everything the
    miner waited on while serving hops, barrier and upstream waits included) over compute per hop;
    None before any compute."""
    if main.get("compute", 0.0) <= 0:
        return None
    return sum(main.get(a, 0.0) for a in IN_ROUND) / main["compute"]
