"""Training transitions: register, leave, lease, complete (hop done), step_done and tick.

They change the state record in place and do no I/O: time (`now`) and randomness (`rng`) are
passed in, so the same calls on the same state give the same result, and the caller (the
service) persists what changed. Hops are placed and re-placed by bridge.dispatch; claims about
bad hop outputs are judged in bridge.claims. A transition checks what it was asked before it
changes anything, so a refusal (TransitionError) keeps only what `tick` applied first (lease
expiries and merge timeouts, which the clock alone would have applied).
"""
from __future__ import annotations

import logging
import random
from itertools import islice
from typing import Any, Optional

from bridge import round_start, rounds, speed
from bridge.dispatch import expire, make_bwd, new_hop, retry_hop, route_fwd
from bridge.records import FwdRecord, Hop, Miner, ObjRef, State, TransitionError
from bridge.routing import choose_stage
from protocol.keys import HopOutputKey
from protocol.lifecycle import HopKind, HopStatus, Phase, SampleStatus

__all__ = ["register", "leave", "lease", "check_done", "complete", "step_done", "tick",
           "LeaseResult", "output_key"]

log = logging.getLogger(__name__)

LeaseResult = tuple[str, list[Hop], float]  # action, hops, retry_after


def output_key(st: State, hop: Hop) -> Optional[str]:
    """`runs/{run}/r{round}/s{stage}/{act|grad}/{hop_id}`, or None for a stage-0 backward.
    The sealed key: only the bridge writes it (a server-side copy at `done`)."""
    if hop.stage == 0 and hop.kind in (HopKind.BWD, HopKind.FWDBWD):
        return None
    part = "act" if hop.kind == HopKind.FWD else "grad"
    return HopOutputKey(st.run.run_id, hop.round, hop.stage, part, hop.hop_id).final


def _miner(st: State, hotkey: str) -> Miner:
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("not_registered",
                              f"hotkey {hotkey} has no stage: POST /v1/miners/register first")
    return m


def tick(st: State, now: float, rng: random.Random) -> None:
    """Apply everything that happens with time: lease expiries and merge-set timeouts."""
    expire(st, now, rng)
    if st.phase == Phase.MERGE:
        rounds.maybe_freeze(st, now)


def register(st: State, hotkey: str, now: float, rng: random.Random,
             numerics: tuple[str, str] = ("cpu", "float32"), device_name: str = "") -> Miner:
    """Assign a stage (new miner) or keep it (rejoin: in-flight work released, graphs dropped);
    `numerics` is the declared (device class, compute dtype), `device_name` the GPU model."""
    m = st.miners.get(hotkey)
    if m is not None:
        if st.healthy(m, now) and now - m.last_seen < st.tun.health_timeout / 4:
            log.warning("hotkey %s registered again while its previous process was heard from "
                        "%.0fs ago: if two live processes share this hotkey they take each "
                        "other's stage and leases; run one process per hotkey", hotkey,
                        now - m.last_seen)
        m.epoch += 1
        m.device_class, m.compute_dtype = numerics
        m.device_name = device_name
        m.active, m.last_seen = True, now
        for hid in list(st.leased.get(hotkey, ())) + list(st.queue.get(hotkey, ())):
            retry_hop(st, st.hops[hid], now, rng, "rejoin", penalize_holder=False)
        worked = m.round_steps + m.step_samples + m.round_samples + m.open_graphs > 0
        m.quota_used = m.step_samples = m.open_graphs = m.round_samples = 0
        if worked and st.phase == Phase.TRAIN and _stage_has_peer(st, m, now):
            # Its inner steps of this round died with the old process: a few samples done now
            # would enter the merge at a 2-replica stage's equal weight and shrink the update,
            # so it waits for the next round while its peers finish this one.
            m.round_steps, m.sits_out_round = 0, st.round
        log.info("miner %s rejoined stage %d (epoch %d)%s", hotkey, m.stage, m.epoch,
                 "; it sits out the rest of this round" if m.sits_out_round == st.round else "")
        return m
    stage = choose_stage(st, now)
    peers = [p.throughput for p in st.stage_miners(stage)]
    m = Miner(hotkey=hotkey, stage=stage, registered_at=now, last_seen=now, round=st.round,
              throughput=sum(peers) / len(peers) if peers else 1.0,
              device_class=numerics[0], compute_dtype=numerics[1], device_name=device_name)
    st.miners[hotkey] = m
    log.info("miner %s registered on stage %d", hotkey, stage)
    if st.phase == Phase.WAITING and all(st.stage_miners(s) for s in range(st.run.n_stages)):
        round_start.start_round(st, 0, now)
    return m


def _stage_has_peer(st: State, m: Miner, now: float) -> bool:
    """Whether another replica of m's stage can take this round's work: live, not sitting the round
    out itself and not quarantined (two replicas that both restarted, or one beside a quarantined
    peer, must not wait on each other: the stage would halt)."""
    return any(p is not m and p.active and st.healthy(p, now) and p.sits_out_round != st.round
               and not st.quarantined(p, now) for p in st.stage_miners(m.stage))


def leave(st: State, hotkey: str, now: float, rng: random.Random) -> int:
    """A miner says it is stopping: its leased and queued hops go elsewhere now (no penalty) and
    it stops counting towards its stage; returns how many hops moved. Registering again rejoins."""
    m = _miner(st, hotkey)
    held = list(st.leased.get(hotkey, ())) + list(st.queue.get(hotkey, ()))
    for hid in held:
        retry_hop(st, st.hops[hid], now, rng, "miner left", penalize_holder=False)
    m.active, m.last_seen = False, now
    log.info("miner %s left stage %d (%d hops moved)", hotkey, m.stage, len(held))
    return len(held)


def _check_sizes(st: State, stage: int, fwd_bytes: int, bwd_bytes: int) -> None:
    """Output sizes follow the run's code shape exactly (`tun.code_bytes`): a grant is never
    larger than the code it carries."""
    cap, last, code = st.run.max_object_bytes, st.run.n_stages - 1, st.tun.code_bytes
    for name, val, needed in (("fwd_out_bytes", fwd_bytes, stage < last),
                              ("bwd_out_bytes", bwd_bytes, stage > 0)):
        if val > cap:
            raise TransitionError("oversized",
                                  f"{name}={val} exceeds max_object_bytes={cap}")
        if needed and val <= 0:
            raise TransitionError("bad_size", f"{name} must be > 0 for stage {stage}")
        if code is not None and val not in ((code,) if needed else (0, code)):
            raise TransitionError("bad_size", f"{name}={val}, but this run's code is "
                                  f"exactly {code} bytes (model config, batch_size, wire codec)"
                                  + ("" if needed else f"; send 0 at stage {stage}"))


def lease(st: State, hotkey: str, max_hops: int, fwd_bytes: int, bwd_bytes: int,
          now: float, rng: random.Random, max_open_graphs: int = 0) -> LeaseResult:
    """Hand a miner up to `max_hops` hops (backwards first), or tell it what to do instead.
    `max_open_graphs` > 0 bounds the forward graphs it holds: no pooled forward is handed out
    while its open graphs plus the forwards it holds reach it (samples enter the pipeline at
    stage 0's pool, so this bounds every stage's graphs, 1F1B-like)."""
    m = _miner(st, hotkey)
    _check_sizes(st, m.stage, fwd_bytes, bwd_bytes)
    tick(st, now, rng)
    m.last_seen = now
    if not m.active:
        return "reassign", [], 0.0
    if st.quarantined(m, now) and st.phase in (Phase.TRAIN, Phase.MERGE):
        return "wait", [], 5.0  # a validator failed it: no work until the quarantine ends
    if st.phase == Phase.WAITING:
        return "wait", [], 1.0
    if st.phase == Phase.DONE:
        return "done", [], 0.0
    if st.phase == Phase.MERGE:
        return ("step" if m.step_samples > 0 else "merge"), [], 0.0
    if m.sits_out_round == st.round:
        if _stage_has_peer(st, m, now):
            return "wait", [], 1.0
        m.sits_out_round = -1  # its peers are gone: the stage needs it now
    quota = st.run.micro_batches_per_step
    got: list[Hop] = []
    queue = st.queue.get(hotkey, {})
    pooled = speed.pool_room(st, m, now)  # a much slower replica leaves pooled work to its fast peers
    # assigned hops (quota already reserved at routing), backwards first
    for want_bwd in (True, False):
        for hid in list(queue):
            if len(got) >= max_hops:
                break
            hop = st.hops[hid]
            if (hop.kind == HopKind.BWD) == want_bwd:
                got.append(hop)
        if want_bwd:
            room = min(max_hops - len(got), quota - m.quota_used, pooled)
            for hid in _claimable(st, st.bwd_pool[m.stage], m, now, room):
                m.quota_used += 1
                pooled -= 1
                got.append(st.hops[hid])
    if now >= m.backoff_until and pooled > 0:
        room = min(max_hops - len(got), quota - m.quota_used, pooled)
        if max_open_graphs > 0 and m.stage < st.run.n_stages - 1:
            room = min(room, max_open_graphs - m.open_graphs - _forwards_held(st, m, got))
        if m.stage == 0 and len(st.fwd_pool[0]) < max(room, round_start.MINT_CHUNK // 2) \
                and st.minted < st.run.samples_per_round:
            round_start.mint_more(st)
        for hid in _claimable(st, st.fwd_pool[m.stage], m, now, room):
            m.quota_used += 1
            got.append(st.hops[hid])
    for hop in got:
        _lease_one(st, m, hop, fwd_bytes, bwd_bytes, now)
    if got:
        if st.on_probation(m, now) and hotkey not in st.unpaid:
            st.unpaid.append(hotkey)  # keeps its stage alive after a failed audit: not paid for it
            log.warning("miner %s failed an audit but is the last live replica of stage %d: it keeps "
                        "the stage training this round, unpaid", hotkey[:10], m.stage)
        return "work", got, 0.0
    if not st.leased.get(hotkey) and m.open_graphs == 0 and not queue:
        if m.quota_used >= quota or st.fwd_pending[m.stage] <= 0:
            if m.step_samples > 0:
                return "step", [], 0.0
            m.quota_used = 0  # reservations all went elsewhere: nothing to step over
    return "wait", [], 0.25


def _forwards_held(st: State, m: Miner, got: list[Hop]) -> int:
    """Forwards `m` holds (leased, queued, or in this answer): graphs it will open."""
    held = set(st.leased.get(m.hotkey, ())) | set(st.queue.get(m.hotkey, ())) | {h.hop_id for h in got}
    return sum(1 for hid in held if st.hops[hid].kind == HopKind.FWD)


def _claimable(st: State, pool: Any, m: Miner, now: float, room: int) -> list[str]:
    """Up to `room` pooled hop ids `m` may take: not ones it was charged on, while another
    healthy replica of the stage could take them instead."""
    if room <= 0:
        return []
    ids = list(islice(pool, room))
    if not any(m.hotkey in st.hops[h].avoid for h in ids):
        return ids  # the common case: one slice, no scan
    alone = not any(o.hotkey != m.hotkey and st.healthy(o, now) for o in st.stage_miners(m.stage))
    return list(islice((h for h in pool if alone or m.hotkey not in st.hops[h].avoid), room))


def _lease_one(st: State, m: Miner, hop: Hop, fwd_bytes: int, bwd_bytes: int,
               now: float) -> None:
    st.unplace(hop)
    hop.status, hop.leased_to, hop.assigned_to = HopStatus.LEASED, m.hotkey, m.hotkey
    hop.leased_at, hop.deadline = now, now + st.run.lease_seconds
    hop.inner_step, hop.epoch = m.inner_step, m.epoch
    hop.device_class, hop.compute_dtype, hop.device_name = m.device_class, m.compute_dtype, m.device_name
    hop.out_key = output_key(st, hop)
    hop.out_size = 0 if hop.out_key is None else (fwd_bytes if hop.kind == HopKind.FWD else bwd_bytes)
    st.place(hop)


def check_done(st: State, hotkey: str, hop_id: str, now: float) -> Hop:
    """The hop `hotkey` may report done now (409 otherwise); no mutation."""
    hop = st.hops.get(hop_id)
    if hop is None:
        raise TransitionError("unknown_hop", f"hop_id {hop_id} is not an open hop")
    if hop.leased_to != hotkey:
        raise TransitionError("not_yours", f"hop {hop_id} is not leased to {hotkey}")
    if hop.status != HopStatus.LEASED:
        raise TransitionError("not_leased", f"hop {hop_id} is {hop.status}, not leased")
    if now > hop.deadline:
        raise TransitionError("expired", f"lease of hop {hop_id} expired")
    return hop


def complete(st: State, hotkey: str, hop_id: str, sha256: Optional[str], size: int,
             loss: Optional[float], now: float, rng: random.Random) -> Hop:
    """Apply a finished hop once: record its output, create and route the next hop."""
    tick(st, now, rng)
    hop = check_done(st, hotkey, hop_id, now)
    if hop.out_key is not None and (sha256 is None or size != hop.out_size):
        raise TransitionError("bad_size", f"hop {hop_id}: size must be {hop.out_size} "
                              f"with a sha256, got size={size} sha256={sha256}")
    m = st.miners[hotkey]
    st.unplace(hop)
    hop.status, hop.done_at, hop.out_sha = HopStatus.DONE, now, sha256
    hop.loss = loss if hop.kind == HopKind.FWDBWD else None
    dt = max(1e-3, now - max(m.last_done_at, hop.leased_at))
    m.throughput = (1 - st.tun.ema) * m.throughput + st.tun.ema / dt
    speed.record_hop_seconds(st, m, dt)
    m.health = min(1.0, m.health + 0.2 * (1.0 - m.health))
    m.last_done_at, m.last_seen = now, now
    m.hops_done += 1
    m.bytes_moved += size
    st.stage_counters[hop.stage]["hops_done"] += 1
    st.stage_counters[hop.stage]["bytes"] += size
    sample = st.samples[hop.sample_id]
    out = None if hop.out_key is None else ObjRef(hop.out_key, sha256, size)
    if hop.kind.runs_forward:
        sample.fwd_done_stage = hop.stage
        sample.fwd_by[hop.stage] = FwdRecord(hotkey, m.epoch, hop_id)
        st.fwd_pending[hop.stage] -= 1
    if hop.kind == HopKind.FWD:
        m.open_graphs += 1
        nxt = HopKind.FWDBWD if hop.stage + 1 == st.run.n_stages - 1 else HopKind.FWD
        route_fwd(st, new_hop(st, hop, hop.stage + 1, nxt, act_in=out), now, rng)
        return hop
    m.step_samples += 1
    m.round_samples += 1
    st.wake[("miner", hotkey)] = True  # its parked lease may now be answered `step` (or get room)
    if hop.kind == HopKind.FWDBWD:
        st.recent_losses = (st.recent_losses + [loss])[-256:] if loss is not None else st.recent_losses
    elif not hop.recompute:
        rounds.drop_graph(st, sample, hop.stage)
    if hop.stage == 0:
        rounds.finish_sample(st, sample, SampleStatus.COMPLETED, "", now)
    else:
        make_bwd(st, sample, hop, out, now, rng)
    return hop


def step_done(st: State, hotkey: str, round_: int, inner_step: int, samples: int,
              now: float) -> Miner:
    """Advance a miner's inner step once (a repeated report of the last step is a no-op)."""
    m = _miner(st, hotkey)
    if round_ != st.round:
        raise TransitionError("wrong_round", f"round={round_} but the run is at {st.round}")
    if inner_step == m.inner_step - 1 and m.step_samples == 0:
        return m  # the same report again (client retry): applied once already
    if inner_step != m.inner_step:
        raise TransitionError("wrong_step", f"inner_step={inner_step}, expected {m.inner_step}")
    if st.leased.get(hotkey) or m.open_graphs:
        raise TransitionError("open_work", "finish leased hops and backwards before stepping")
    if m.step_samples == 0 or samples != m.step_samples:
        raise TransitionError("wrong_samples",
                              f"samples={samples}, the bridge counted {m.step_samples}")
    m.inner_step += 1
    m.round_steps += 1
    m.quota_used = m.step_samples = 0
    m.last_seen = now
    return m
