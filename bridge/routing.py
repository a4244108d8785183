"""Stochastic pathfinding: pick the replica of a stage that gets the next hop, and stage choice."""
from __future__ import annotations

import random
from typing import Optional, Sequence

from bridge import speed
from bridge.records import Miner, State

__all__ = ["route_weight", "eligible", "pick_replica", "choose_stage"]


def route_weight(st: State, m: Miner) -> float:
    """Throughput estimate x health / (1 + queue length)."""
    queued = len(st.queue.get(m.hotkey, ())) + len(st.leased.get(m.hotkey, ()))
    return max(m.throughput, 1e-6) * max(m.health, st.tun.min_health) / (1.0 + queued)


def eligible(st: State, m: Miner, now: float) -> bool:
    """Healthy, not backing off, not sitting out the round, and with forward quota room."""
    return (st.healthy(m, now) and now >= m.backoff_until and m.sits_out_round != st.round
            and m.quota_used < st.run.micro_batches_per_step)


def pick_replica(st: State, stage: int, now: float, rng: random.Random,
                 avoid: Sequence[str] = ()) -> Optional[Miner]:
    """A replica of `stage` drawn with probability proportional to its route weight, or None;
    never one in `avoid` (charged on this work) while another is eligible, nor one much slower
    to finish it than the soonest available peer (`bridge.speed`), even one out of quota."""
    cands = [m for m in st.stage_miners(stage) if eligible(st, m, now)]
    if avoid:
        cands = [m for m in cands if m.hotkey not in avoid] or cands
    if not cands:
        return None
    peers = speed.stage_peers(st, stage, now) + cands
    cands = [m for m in cands if speed.fast_enough(st, m, peers, now)]
    if not cands:
        return None  # the pool: a faster replica takes it once it steps (a slow one only if none does)
    weights = [route_weight(st, m) for m in cands]
    x = rng.random() * sum(weights)
    for m, w in zip(cands, weights):
        x -= w
        if x < 0:
            return m
    return cands[-1]


def choose_stage(st: State, now: float) -> int:
    """Stage with the fewest healthy replicas; ties: slowest total throughput, then lowest index."""
    def key(s: int) -> tuple[int, float, int]:
        ms = [m for m in st.stage_miners(s) if st.healthy(m, now)]
        return (len(ms), sum(m.throughput for m in ms), s)
    return min(range(st.run.n_stages), key=key)
