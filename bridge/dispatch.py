"""Placing hops: a new hop goes to a replica or its stage's pool, and a closed attempt's work
is done again elsewhere (lease expiry, a failed claim, a rejected output).

Transitions on the state record, changed in place; no I/O: time and randomness are passed in.
"""
from __future__ import annotations

import heapq
import logging
import random
from typing import Optional

from bridge import rounds
from bridge.records import Hop, Miner, ObjRef, Sample, State
from bridge.routing import pick_replica
from protocol.lifecycle import HopKind, HopStatus, SampleStatus

__all__ = ["new_hop", "route_fwd", "make_bwd", "penalize", "retry_hop", "redo_hop", "expire"]

log = logging.getLogger(__name__)


def new_hop(st: State, src: Hop, stage: int, kind: HopKind, act_in: Optional[ObjRef] = None,
            grad_in: Optional[ObjRef] = None, attempt: int = 1, avoid: tuple = ()) -> Hop:
    """A fresh open hop of `src`'s sample (not yet placed: route it)."""
    hop = Hop(hop_id=st.next_hop_id(), sample_id=src.sample_id, round=src.round, stage=stage,
              kind=kind, attempt=attempt, act_in=act_in, grad_in=grad_in, avoid=tuple(avoid))
    st.hops[hop.hop_id] = hop
    return hop


def _assign(st: State, hop: Hop, m: Miner, now: float) -> None:
    hop.status, hop.assigned_to = HopStatus.ASSIGNED, m.hotkey
    hop.deadline = now + st.run.lease_seconds  # claim deadline
    st.place(hop)


def route_fwd(st: State, hop: Hop, now: float, rng: random.Random) -> None:
    """Stage-0 forwards wait in the pool; later ones go to a replica picked by pathfinding."""
    m = pick_replica(st, hop.stage, now, rng, hop.avoid) if hop.stage > 0 else None
    if m is None:
        st.place(hop)  # pool: any eligible replica claims it at lease time
        return
    m.quota_used += 1
    _assign(st, hop, m, now)


def make_bwd(st: State, sample: Sample, src: Hop, grad: Optional[ObjRef], now: float,
             rng: random.Random, attempt: int = 1, avoid: tuple = ()) -> None:
    """The stage s-1 backward: to the forward's replica if it still holds the graph, else
    recompute elsewhere (routed like a forward, counted against quota)."""
    stage = src.stage - 1
    fwd = sample.fwd_by[stage]
    fwd_hop = st.hops[fwd.hop_id]
    hop = new_hop(st, src, stage, HopKind.BWD, grad_in=grad, attempt=attempt, avoid=avoid)
    hop.fwd_hop_id = fwd_hop.hop_id
    holder = st.miners.get(fwd.hotkey)
    if holder is not None and fwd.epoch == holder.epoch and st.healthy(holder, now) \
            and holder.hotkey not in hop.avoid:
        _assign(st, hop, holder, now)
        return
    rounds.drop_graph(st, sample, stage)
    hop.recompute, hop.act_in = True, fwd_hop.act_in
    st.stage_counters[stage]["reroutes"] += 1
    log.info("reroute: bwd %s of sample %d at stage %d recomputes elsewhere",
             hop.hop_id, sample.sample_id, stage)
    route_fwd(st, hop, now, rng) if stage > 0 else _route_stage0_bwd(st, hop, now, rng)


def _route_stage0_bwd(st: State, hop: Hop, now: float, rng: random.Random) -> None:
    m = pick_replica(st, 0, now, rng, hop.avoid)
    if m is None:
        st.place(hop)
        return
    m.quota_used += 1
    _assign(st, hop, m, now)


def penalize(st: State, m: Miner, now: float) -> None:
    """Halve a miner's health (routing weight) and keep routed work off it for a while."""
    m.health = max(st.tun.min_health, m.health * 0.5)
    m.backoff_until = now + st.tun.backoff_seconds


def retry_hop(st: State, hop: Hop, now: float, rng: random.Random, why: str,
              penalize_holder: bool = True, status: HopStatus = HopStatus.EXPIRED,
              avoid: tuple = ()) -> None:
    """Close a hop attempt and send the work elsewhere (attempt+1, never to a hotkey in
    `avoid` while another replica can take it), or abandon the sample once attempts are
    used up."""
    holder = st.miners.get(hop.leased_to or hop.assigned_to or "")
    st.unplace(hop)
    hop.status, hop.note = status, why
    if holder is not None and penalize_holder:
        holder.expiries += status == HopStatus.EXPIRED
        penalize(st, holder, now)
    st.stage_counters[hop.stage]["expiries"] += status == HopStatus.EXPIRED
    sample = st.samples[hop.sample_id]
    if hop.attempt >= st.run.max_attempts:
        rounds.finish_sample(st, sample, SampleStatus.ABANDONED, f"{why} after {hop.attempt} attempts", now)
        return
    redo_hop(st, hop, now, rng, avoid)


def redo_hop(st: State, hop: Hop, now: float, rng: random.Random, avoid: tuple = ()) -> None:
    """Route `hop`'s work again as attempt+1: a forward from the same input, a backward
    (recomputed when its graph is gone) from the same incoming gradient."""
    sample = st.samples[hop.sample_id]
    st.stage_counters[hop.stage]["reroutes"] += 1
    av = tuple(dict.fromkeys([*hop.avoid, *avoid]))
    if hop.kind == HopKind.BWD:
        if not hop.recompute:
            rounds.drop_graph(st, sample, hop.stage)
        src = Hop(hop_id="", sample_id=hop.sample_id, round=hop.round, stage=hop.stage + 1,
                  kind=HopKind.BWD)
        make_bwd(st, sample, src, hop.grad_in, now, rng, attempt=hop.attempt + 1, avoid=av)
        return
    route_fwd(st, new_hop(st, hop, hop.stage, hop.kind, act_in=hop.act_in,
                            attempt=hop.attempt + 1, avoid=av), now, rng)


def expire(st: State, now: float, rng: random.Random) -> int:
    """Expire every lease (and unclaimed assignment) past its deadline; returns how many."""
    n = 0
    while st.heap and st.heap[0][0] < now:
        deadline, hid = st.heap[0]
        heapq.heappop(st.heap)
        hop = st.hops.get(hid)
        if hop is None or hop.status not in (HopStatus.ASSIGNED, HopStatus.LEASED) or hop.deadline != deadline:
            continue
        log.info("lease expiry: hop %s (%s stage %d) held by %s", hid, hop.kind, hop.stage,
                 hop.leased_to or hop.assigned_to)
        retry_hop(st, hop, now, rng, "lease expired")
        n += 1
    return n
