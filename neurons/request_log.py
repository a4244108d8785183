"""Every request a miner makes, counted by route and by the kind of hop it served.

The bridge client and the object transfer call `on_call` / `on_transfer` after each request;
compute calls `on_compute`. A lease answer names its hops and their object URLs, so each later
GET, PUT and `done` is tied to the hop it serves without touching the miner's loop. When a hop's
`done` is answered, its requests are folded into per-kind totals: how many requests (round trips)
of each route lie on the hop's path, their seconds and bytes, and how much of that time this
miner spent computing other hops (overlapped, so not idle). Everything else (steps, merges,
registration) is totalled per route. `summary()` is what the status file and metrics show.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["RequestLog", "overlap", "HOP_PATH"]

HOP_PATH = ("lease", "lease_prefetch", "lease_carried", "object_get", "object_put", "hop_done")  # a hop's requests, in order
# lease_carried: hops that came in the answer to a `done` or `step_done` report, so no round trip of their own
_MAX_OPEN = 2000  # hops leased but not yet done that we keep traces for (older ones are dropped)


def overlap(t0: float, t1: float, intervals: "list[tuple[float, float]] | deque") -> float:
    """Seconds of [t0, t1] covered by `intervals` (disjoint, as one compute thread's are)."""
    return sum(max(0.0, min(t1, b) - max(t0, a)) for a, b in intervals)


@dataclass
class _Trace:
    kind: str
    reqs: list[tuple[str, float, float, int, int]] = field(default_factory=list)  # (route, t0, t1, bytes, tries)


def _blank() -> dict:
    # count: HTTP round trips (retries included); seconds: wall time of those requests;
    # carried: hops leased in a report's answer (lease_carried), which cost no round trip of their own
    return {"count": 0, "seconds": 0.0, "overlapped_s": 0.0, "bytes": 0, "carried": 0}


class RequestLog:
    """Thread-safe request counters of one miner (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._open: dict[str, _Trace] = {}  # hop id -> requests so far
        self._urls: dict[str, str] = {}  # object URL -> hop id
        self._compute: deque = deque(maxlen=256)  # recent (start, end) of computed hops
        self._finished: list[_Trace] = []  # done hops whose overlap with compute is not settled yet
        self.kinds: dict[str, dict] = {}  # hop kind -> {"hops": n, "requests": {route: totals}}
        self.routes: dict[str, dict] = {}  # route -> totals (every request, hop or not)
        self.failed: dict[str, int] = {}

    # ----- hooks -----
    def on_call(self, route: str, req: Any, resp: Any, t0: float, t1: float, ok: bool, tries: int = 1) -> None:
        """A bridge call ended (`resp` None when it failed) after `tries` HTTP round trips."""
        if route == "lease" and getattr(req, "wait_ms", 1) == 0:
            route = "lease_prefetch"  # asked while computing, answered at once
        with self._lock:
            self._total(route, t0, t1, 0, ok, tries)
            if not ok:
                return
            hops = (getattr(resp, "hops", None) or []) if route.startswith("lease") else []
            how, n = route, tries
            carried = getattr(resp, "lease", None)  # the next hops, answered with a report
            if carried is not None:
                hops, how, n = carried.hops, "lease_carried", 0  # the report's round trip is counted already
            for h in hops:
                tr = self._open[h.hop_id] = _Trace(str(h.kind))
                tr.reqs.append((how, t0, t1 if n else t0, 0, n))  # a carried lease adds no seconds either
                for ref in (h.act_in, h.grad_in):
                    if ref is not None:
                        self._urls[ref.url] = h.hop_id
                if h.output is not None:
                    self._urls[h.output.put_url] = h.hop_id
            self._trim()
            hop_id = getattr(req, "hop_id", None)
            if route == "hop_done" and hop_id in self._open:
                tr = self._open.pop(hop_id)
                tr.reqs.append((route, t0, t1, 0, tries))
                self._finished.append(tr)  # folded once compute has passed its end (see _flush)
            elif route == "hop_fail":
                self._open.pop(hop_id, None)

    def on_transfer(self, method: str, url: str, nbytes: int, t0: float, t1: float, ok: bool,
                    tries: int = 1) -> None:
        """An object GET or PUT ended after `tries` HTTP round trips."""
        route = f"object_{method.lower()}"
        with self._lock:
            self._total(route, t0, t1, nbytes, ok, tries)
            hop_id = self._urls.pop(url, None)
            if ok and hop_id in self._open:
                self._open[hop_id].reqs.append((route, t0, t1, nbytes, tries))

    def on_compute(self, seconds: float, hop: Any) -> None:
        """A hop finished computing (`MinerStatus` listener signature)."""
        end = self.clock()
        with self._lock:
            self._compute.append((end - seconds, end))
            self._flush(end)

    def _flush(self, settled_until: float) -> None:
        """Fold the done hops whose requests all ended before `settled_until`: a compute still running
        then may yet overlap the later ones."""
        keep = []
        for tr in self._finished:
            (self._fold(tr) if max(req[2] for req in tr.reqs) <= settled_until else keep.append(tr))
        self._finished = keep

    # ----- folding -----
    def _total(self, route: str, t0: float, t1: float, nbytes: int, ok: bool, tries: int) -> None:
        t = self.routes.setdefault(route, _blank())
        t["count"] += tries
        t["seconds"] += t1 - t0
        t["bytes"] += nbytes
        if not ok:
            self.failed[route] = self.failed.get(route, 0) + 1

    def _fold(self, tr: _Trace) -> None:
        k = self.kinds.setdefault(tr.kind, {"hops": 0, "requests": {}})
        k["hops"] += 1
        for route, t0, t1, nbytes, tries in tr.reqs:
            r = k["requests"].setdefault(route, _blank())
            r["count"] += tries
            r["carried"] += tries == 0
            r["seconds"] += t1 - t0
            r["overlapped_s"] += overlap(t0, t1, self._compute)
            r["bytes"] += nbytes

    def _trim(self) -> None:
        while len(self._open) > _MAX_OPEN:
            self._open.pop(next(iter(self._open)))
        while len(self._urls) > 4 * _MAX_OPEN:
            self._urls.pop(next(iter(self._urls)))

    def settle(self) -> None:
        """Fold every done hop now (no compute will run any more: the miner is stopping)."""
        with self._lock:
            self._flush(float("inf"))

    def summary(self) -> dict:
        """{"hop_kinds": {kind: {"hops", "requests": {route: totals}}}, "routes": {route: totals}, "failed": ...}."""
        with self._lock:
            # A compute in progress can only overlap requests of the last few seconds; older ones are settled.
            last = self._compute[-1][1] if self._compute else float("-inf")
            self._flush(max(last, self.clock() - 60.0))
            return {"hop_kinds": {k: {"hops": v["hops"], "requests": {r: dict(t) for r, t in v["requests"].items()}}
                                  for k, v in self.kinds.items()},
                    "routes": {r: dict(t) for r, t in self.routes.items()}, "failed": dict(self.failed)}
