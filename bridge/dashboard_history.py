"""Per-round summaries for the dashboard, from the hop log: loss curve and miners' compute fraction.

A closed round never changes, so each is summarised once and cached; after a restart the cache
is rebuilt from the database (nothing is kept only in memory).
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

from bridge.records import Hop

__all__ = ["busy_seconds", "summarise_round", "RoundHistory", "MAX_ROUNDS"]

MAX_ROUNDS = 200


def busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlapping leases count once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def summarise_round(round_: int, hops: list[Hop]) -> dict[str, Any]:
    """Mean loss of the round's hops that carry one, and per-miner hops and busy fraction."""
    losses = [h.loss for h in hops if h.loss is not None]
    span = (max(h.done_at for h in hops) - min(h.leased_at for h in hops)) if hops else 0.0
    miners: dict[str, dict[str, Any]] = {}
    by_miner: dict[str, list[Hop]] = {}
    for h in hops:
        by_miner.setdefault(h.leased_to or "", []).append(h)
    for hotkey, mine in sorted(by_miner.items()):
        busy = busy_seconds((h.leased_at, h.done_at) for h in mine)
        miners[hotkey] = {"hops": len(mine),
                          "compute_fraction": min(1.0, busy / span) if span > 0 else 0.0}
    return {"round": round_, "loss": sum(losses) / len(losses) if losses else None,
            "hops": len(hops), "seconds": span, "miners": miners}


class RoundHistory:
    """Cached summaries of closed rounds (the last `MAX_ROUNDS`)."""

    def __init__(self, done_hops: Callable[[int, Any], list[Hop]],
                 on_new: Callable[[dict[str, Any]], None] | None = None) -> None:
        self._done_hops = done_hops
        self._on_new = on_new
        self._cache: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def loss(self, round_: int) -> float | None:
        """Mean last-stage hop loss of a closed round (from the cache, else the hop log)."""
        with self._lock:
            hit = self._cache.get(round_)
        return (hit or summarise_round(round_, self._done_hops(round_, None)))["loss"]

    def closed(self, first_open_round: int) -> list[dict[str, Any]]:
        """Summaries of rounds before `first_open_round`, oldest first (reads the DB for new ones)."""
        wanted = range(max(0, first_open_round - MAX_ROUNDS), first_open_round)
        with self._lock:
            for r in wanted:
                if r not in self._cache:
                    self._cache[r] = summarise_round(r, self._done_hops(r, None))
                    if self._on_new is not None:
                        self._on_new(self._cache[r])
            for r in [r for r in self._cache if r not in wanted]:
                del self._cache[r]
            return [self._cache[r] for r in wanted]
