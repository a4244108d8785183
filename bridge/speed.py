"""Routing around slow replicas: each miner's measured hop time, and whether it should take work now.

Every accepted `done` updates the miner's `hop_seconds`, an EWMA of the bridge's own clock from
lease (or its previous done) to this done: verified time, never the miner's word. A replica's
expected finish time for one more hop is `(1 + backlog) x hop_seconds`. A replica whose finish
time is more than `tun.slow_factor` times the best of its stage's available peers gets no new
work: it is used only when the fast ones are busy (their backlog makes them no sooner), so it
never holds the round's tail or another stage's inner step. A replica that has done nothing for
`probe_interval` (`tun.probe_seconds`, or sooner where hops are short) may take one hop anyway,
and a faster sample weighs more than a slower one, so a slow estimate recovers; one never measured
holds one hop at a time until its first done. Pure: no I/O.
"""
from __future__ import annotations

from statistics import median
from typing import Iterable, Optional

from bridge.records import Miner, State

__all__ = ["record_hop_seconds", "estimate", "backlog", "finish_time", "available", "stage_peers",
           "allowance", "fast_enough", "pool_room", "probe_interval", "UNLIMITED"]


def record_hop_seconds(st: State, m: Miner, seconds: float) -> None:
    """Fold one verified hop time into the miner's EWMA (the first one is taken as is). A sample
    faster than the estimate weighs `recover_weight`: no replica finishes faster than it can, while
    a slow one may be a one-off (a warm-up, a page-in, a stalled link), so an honest replica that
    was judged slow once is trusted again within a few probes instead of dozens."""
    a = st.tun.ema if seconds >= m.hop_seconds else max(st.tun.ema, st.tun.recover_weight)
    m.hop_seconds = seconds if m.hop_seconds <= 0 else (1 - a) * m.hop_seconds + a * seconds


def estimate(st: State, m: Miner, now: float) -> float:
    """Seconds per hop: the miner's EWMA, or (never measured) the median of its stage's
    measured peers (0 when nobody there is measured yet); and at least as long as the hop it is
    on now has taken so far (a new or newly slow replica shows itself before its first done)."""
    est = m.hop_seconds
    if est <= 0:
        known = [p.hop_seconds for p in st.stage_miners(m.stage) if p.hop_seconds > 0]
        est = median(known) if known else 0.0
    held = st.leased.get(m.hotkey)
    if held:
        since = max(m.last_done_at, min(st.hops[h].leased_at for h in held))
        est = max(est, now - since)
    return est


def backlog(st: State, m: Miner) -> int:
    """Hops assigned or leased to the miner and not done yet."""
    return len(st.queue.get(m.hotkey, ())) + len(st.leased.get(m.hotkey, ()))


def finish_time(st: State, m: Miner, now: float) -> float:
    """Expected seconds until the miner would finish one more hop given to it now."""
    return (1 + backlog(st, m)) * estimate(st, m, now)


def available(st: State, m: Miner, now: float) -> bool:
    """A peer that would take work soon: healthy, not backing off, not sitting out, and heard
    from lately (a silent one may be dead; it must not keep work from the others). One whose
    forward quota is used up counts: it steps and takes more sooner than a slow peer finishes."""
    silence = max(st.tun.peer_silence, 3 * finish_time(st, m, now))
    return (st.healthy(m, now) and now >= m.backoff_until and m.sits_out_round != st.round
            and now - m.last_seen <= silence)


def stage_peers(st: State, stage: int, now: float) -> list[Miner]:
    """The available replicas of a stage (see `available`)."""
    return [p for p in st.stage_miners(stage) if available(st, p, now)]


PROBE_FLOOR_S = 1.0


def probe_interval(st: State, m: Miner) -> float:
    """How long a replica routed around must sit idle before it gets a probe hop: `probe_seconds`,
    or sooner where its stage's hops are short (`probe_hops` of its fastest measured peer's, at
    least a second), so in short rounds it is re-measured within a round, not after many."""
    known = [p.hop_seconds for p in st.stage_miners(m.stage) if p.hotkey != m.hotkey and p.hop_seconds > 0]
    if not known:
        return st.tun.probe_seconds
    return min(st.tun.probe_seconds, max(PROBE_FLOOR_S, st.tun.probe_hops * min(known)))


def _probing(st: State, m: Miner, now: float) -> bool:
    return backlog(st, m) == 0 and now - max(m.last_done_at, m.registered_at) >= probe_interval(st, m)


UNLIMITED = 1 << 30


def allowance(st: State, m: Miner, peers: Iterable[Miner], now: float) -> int:
    """How many more hops `m` should take rather than leave them to the fastest of `peers`
    (itself excluded): any while its finish time is within `slow_factor` of theirs; one at a
    time while it is not measured yet, or as a probe; else none."""
    if not st.tun.route_by_speed:
        return UNLIMITED
    best: Optional[float] = None
    for p in peers:
        if p.hotkey != m.hotkey:
            t = finish_time(st, p, now)
            best = t if best is None else min(best, t)
    if best is None:
        return UNLIMITED  # no peer to leave it to
    if m.hop_seconds <= 0:
        return 0 if backlog(st, m) else 1  # not measured yet: one hop until its first done
    if best <= 0 or finish_time(st, m, now) <= st.tun.slow_factor * best:
        return UNLIMITED
    return 1 if _probing(st, m, now) else 0


def fast_enough(st: State, m: Miner, peers: Iterable[Miner], now: float) -> bool:
    """Whether `m` should get one more hop rather than leave it to the fastest of `peers`."""
    return allowance(st, m, peers, now) > 0


def pool_room(st: State, m: Miner, now: float) -> int:
    """How many pooled hops of its stage (stage-0 forwards, re-routed backwards) `m` may take now."""
    return allowance(st, m, stage_peers(st, m.stage, now), now)
