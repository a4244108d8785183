"""Turn state records into wire messages (presigning URLs). Pure apart from URL signing."""
from __future__ import annotations

from typing import Callable, Optional

from bridge import shard_round
from bridge.records import Hop, ObjRef, StageState, State
from protocol.lifecycle import Phase
from protocol.keys import staging_of
from protocol import messages as msg
from protocol.sync_api import UpdateRef

__all__ = ["hop_message", "state_ref", "update_ref", "metrics", "miner_presence", "hop_record", "merge_item"]

Signer = Callable[[str, float], str]


def _obj(ref: Optional[ObjRef], get_url: Signer, ttl: float) -> Optional[msg.ObjectRef]:
    if ref is None:
        return None
    return msg.ObjectRef(key=ref.key, url=get_url(ref.key, ttl), sha256=ref.sha256, size=ref.size)


def hop_message(hop: Hop, get_url: Signer, put_url: Callable[[str, int, float], str],
                ttl: float) -> msg.Hop:
    """A leased hop as the miner sees it; URLs expire at the lease deadline. The output is
    uploaded to its upload key; `done` seals it at `hop.out_key`, which no URL can write."""
    out = None
    if hop.out_key is not None:
        up = staging_of(hop.out_key)
        out = msg.OutputRef(key=up, put_url=put_url(up, hop.out_size, ttl),
                            size=hop.out_size, expires_at=hop.deadline)
    return msg.Hop(hop_id=hop.hop_id, sample_id=hop.sample_id, round=hop.round,
                   stage=hop.stage, kind=hop.kind, recompute=hop.recompute,
                   inner_step=hop.inner_step, attempt=hop.attempt, fwd_hop_id=hop.fwd_hop_id,
                   act_in=_obj(hop.act_in, get_url, ttl), grad_in=_obj(hop.grad_in, get_url, ttl),
                   output=out, deadline=hop.deadline)


def state_ref(stage: int, ss: StageState, get_url: Signer, ttl: float) -> Optional[msg.StateRef]:
    """A published stage state, or None when it is built from init_seed."""
    if ss.key is None or ss.sha256 is None:
        return None
    return msg.StateRef(round=ss.round, stage=stage, key=ss.key, url=get_url(ss.key, ttl),
                        sha256=ss.sha256, size=ss.size,
                        alt_urls=[get_url(k, ttl) for k in ss.alt_keys])


def update_ref(d: Optional[dict], get_url: Signer, ttl: float) -> Optional[UpdateRef]:
    """A decided merged update of one shard (None: the shard kept its weights)."""
    if d is None:
        return None
    return UpdateRef(sha256=d["sha256"], size=d["size"], key=d["key"], url=get_url(d["key"], ttl),
                     alt_urls=[get_url(k, ttl) for k in d.get("alt_keys", [])])


def merge_item(i: dict, get_url: Signer, ttl: float) -> msg.MergeItem:
    """A recorded pseudo-gradient (merge set, archive, dispute) as the wire shows it."""
    return msg.MergeItem(hotkey=i["hotkey"], stage=i.get("stage", 0), key=i["key"],
                         sha256=i["sha256"], size=i["size"], samples=i["samples"],
                         epoch=i.get("epoch", 0), get_url=get_url(i["key"], ttl))


def hop_record(hop: Hop, get_url: Signer, ttl: float) -> msg.HopRecord:
    """A completed hop for the validator's hop log."""
    out = None if hop.out_key is None else ObjRef(hop.out_key, hop.out_sha, hop.out_size)
    return msg.HopRecord(hop_id=hop.hop_id, sample_id=hop.sample_id, round=hop.round,
                         stage=hop.stage, kind=hop.kind, inner_step=hop.inner_step, epoch=hop.epoch,
                         recompute=hop.recompute, miner_hotkey=hop.leased_to or "",
                         act_in=_obj(hop.act_in, get_url, ttl),
                         grad_in=_obj(hop.grad_in, get_url, ttl),
                         output=_obj(out, get_url, ttl), loss=hop.loss,
                         leased_at=hop.leased_at, done_at=hop.done_at,
                         device_class=hop.device_class, compute_dtype=hop.compute_dtype,
                         device_name=hop.device_name)


def metrics(st: State, now: float) -> msg.Metrics:
    """Per-stage and per-miner counters and round progress."""
    stages = []
    for s in range(st.run.n_stages):
        ms = st.stage_miners(s)
        c = st.stage_counters[s]
        stages.append(msg.StageMetrics(
            stage=s, replicas=len(ms), healthy_replicas=sum(st.healthy(m, now) for m in ms),
            hops_done=c["hops_done"], throughput=sum(m.throughput for m in ms),
            lease_expiries=c["expiries"], reroutes=c["reroutes"], bytes_moved=c["bytes"],
            state_sha=st.stage_states[s].sha256,
            published_round=(shard_round.published_round(st, s) if st.run.sharded
                             else st.stage_states[s].round if st.stage_states[s].sha256 else -1)))
    miners = [msg.MinerMetrics(
        hotkey=m.hotkey, stage=m.stage, healthy=st.healthy(m, now), health=m.health,
        throughput=m.throughput, hops_done=m.hops_done, lease_expiries=m.expiries,
        failures=m.failures, bytes_moved=m.bytes_moved, inner_step=m.inner_step,
        merge_disagreements=m.disagreements, bad_outputs=m.bad_outputs,
        false_claims=m.false_claims, quarantined_until=m.quarantined_until,
        standing=_standing(st, m, now)) for m in sorted(st.miners.values(), key=lambda m: m.hotkey)]
    return msg.Metrics(
        run_id=st.run.run_id, round=st.round, phase=st.phase,
        samples_total=st.run.samples_per_round if st.phase != Phase.WAITING else 0,
        samples_completed=st.r_completed, samples_abandoned=st.r_abandoned,
        abandoned_total=st.abandoned_total, completed_total=st.completed_total,
        abandon_reasons=dict(st.abandon_reasons), stages=stages, miners=miners,
        recent_losses=list(st.recent_losses[-64:]), empty_rounds=st.empty_rounds,
        last_empty_round=st.last_empty.get("round", -1), last_empty_reasons=st.last_empty.get("reasons", {}),
        unpaid=list(st.unpaid))


def miner_presence(st: State, now: float) -> dict[str, dict]:
    """Per miner: whether it is registered (active), when its last lease, hop or step came, the
    round its quarantine ends (None: not quarantined), and whether it is on probation (failed an
    audit, yet keeps its stage training unpaid: no live peer in good standing). The dashboard's
    status column."""
    return {m.hotkey: {"active": m.active, "last_seen": m.last_seen,
                       "quarantined_until": m.quarantined_until if st.quarantined(m, now) else None,
                       "probation_until": m.quarantined_until
                       if st.failed_audit(m) and not st.quarantined(m, now) else None}
            for m in st.miners.values()}


def _standing(st: State, m, now: float) -> str:
    if not st.failed_audit(m):
        return "ok"
    return "quarantined" if st.quarantined(m, now) else "probation"
