"""Round transitions: start (mint samples), sample end, close -> the stages' merges
(bridge.merging), and the next round once every stage's merge is done (`settle`)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge import merging
from bridge.records import Hop, Sample, StageState, State, TransitionError
from protocol.keys import StateKey
from protocol.lifecycle import HopKind, Phase, SampleStatus

__all__ = ["start_round", "mint_more", "MINT_CHUNK", "finish_sample", "drop_graph", "settle", "moved_on",
           "published_state"]

log = logging.getLogger(__name__)

MINT_CHUNK = 512  # samples minted at a time; refilled when stage 0's pool runs low


def start_round(st: State, r: int, now: float) -> None:
    """Mint samples [r*N, (r+1)*N) with their stage-0 forwards, reset every miner's step."""
    if r >= st.run.total_rounds:
        if st.phase == Phase.MERGE:
            _archive(st)
        st.phase = Phase.DONE
        st.events.append(("run_done", r))
        log.info("run %s done after %d rounds", st.run.run_id, r)
        return
    if st.phase == Phase.MERGE:
        _archive(st)
    n, s = st.run.samples_per_round, st.run.n_stages
    st.round_states = [dict(vars(x)) for x in st.stage_states]
    st.phase, st.round = Phase.TRAIN, r
    st.r_completed = st.r_abandoned = 0
    st.fwd_pending = [n] * s
    st.flagged = []
    merging.prune(st)
    st.samples = {}
    st.hops = {}
    st.minted = 0
    st.reindex()
    mint_more(st)
    for m in st.miners.values():
        m.round, m.inner_step, m.quota_used, m.step_samples = r, 0, 0, 0
        m.open_graphs = m.round_steps = m.round_samples = 0
    _archive(st)
    st.events.append(("round_start", r))
    log.info("round %d started: %d samples over %d stages", r, n, s)


def mint_more(st: State) -> int:
    """Mint the round's next MINT_CHUNK samples with their stage-0 forwards (in the pool).

    Minting lazily keeps a round start (and each refill) to a short transition instead of one
    that writes every sample of the round while every request waits."""
    n, r = st.run.samples_per_round, st.round
    k = min(MINT_CHUNK, n - st.minted)
    kind = HopKind.FWDBWD if st.run.n_stages == 1 else HopKind.FWD
    for sid in range(r * n + st.minted, r * n + st.minted + k):
        sample = Sample(sample_id=sid, round=r)
        st.samples[sid] = sample
        hop = Hop(hop_id=st.next_hop_id(), sample_id=sid, round=r, stage=0, kind=kind)
        st.hops[hop.hop_id] = hop
        st.place(hop)
    st.minted += k
    return k


def _archive(st: State) -> None:
    """Persist what validators need about the current round after it is gone from memory."""
    items, cast = merging.archive_items(st)
    st.archive_round(st.round, {"round": st.round, "states": st.round_states, "pseudograds": items,
                                "votes": cast, "flagged": list(st.flagged)})


def drop_graph(st: State, sample: Sample, stage: int) -> None:
    """The forward graph held for (sample, stage) is used up or lost: release it once."""
    rec = sample.fwd_by.get(stage)
    if rec is None or not rec.holds_graph:
        return
    holder = st.miners.get(rec.hotkey)
    if holder is not None and holder.epoch == rec.epoch and holder.open_graphs > 0:
        holder.open_graphs -= 1
    sample.fwd_by[stage] = rec.released()


def finish_sample(st: State, sample: Sample, status: SampleStatus, reason: str,
                  now: float) -> None:
    """End a sample (completed or abandoned with a reason); close the round when all ended."""
    if sample.status != SampleStatus.ACTIVE:
        return
    sample.status, sample.reason = status, reason
    if status == SampleStatus.COMPLETED:
        st.r_completed += 1
        st.completed_total += 1
    else:
        st.r_abandoned += 1
        st.abandoned_total += 1
        st.abandon_reasons[reason] = st.abandon_reasons.get(reason, 0) + 1
        for s in range(sample.fwd_done_stage + 1, st.run.n_stages):
            st.fwd_pending[s] -= 1
        for s in list(sample.fwd_by):
            drop_graph(st, sample, s)
        log.info("sample %d abandoned: %s", sample.sample_id, reason)
    if st.r_completed + st.r_abandoned >= st.run.samples_per_round:
        _close_round(st, now)


def _close_round(st: State, now: float) -> None:
    st.phase = Phase.MERGE
    merging.open_round(st, now)
    st.events.append(("round_close", st.round))
    log.info("round %d closed: %d completed, %d abandoned; merge begins", st.round,
             st.r_completed, st.r_abandoned)
    settle(st, now)


def settle(st: State, now: float) -> None:
    """Apply time to the merging round's merges; start the next round once every stage's is done."""
    if st.phase != Phase.MERGE:
        return
    merging.advance(st, now)
    if merging.all_done(st):
        start_round(st, st.round + 1, now)


def moved_on(st: State, round_: int) -> bool:
    """True when round `round_`'s merge is over: every stage published and the run moved on."""
    return round_ < st.round or (round_ == st.round and st.phase == Phase.DONE)


def published_state(st: State, hotkey: str, round_: int, sha256: str, key: str,
                    archive_next: Optional[dict[str, Any]]) -> tuple[int, StageState]:
    """(stage, state published at the end of `round_`) for a late full-state vote by `hotkey`;
    `archive_next` is round `round_ + 1`'s archive, needed for rounds older than the last."""
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("not_registered", f"hotkey {hotkey} is not registered")
    if key != StateKey(st.run.run_id, round_ + 1, m.stage, hotkey, sha256).staging:
        raise TransitionError("bad_key", f"key {key[:200]!r} is not this state's upload key")
    if round_ == st.round and st.phase == Phase.DONE:
        return m.stage, st.stage_states[m.stage]
    if round_ == st.round - 1:
        return m.stage, StageState(**st.round_states[m.stage])
    states = (archive_next or {}).get("states", [])
    if m.stage >= len(states):
        raise TransitionError("stale_round", f"round {round_} is too old to report on")
    return m.stage, StageState(**states[m.stage])

