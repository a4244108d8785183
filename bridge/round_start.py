"""A round's start: archive what validators need of the round that ends, reset the per-round
state, mint the first samples (and refill: `mint_more`); the run is done after its last round.
Below every merge module (bridge.votes starts the next round once every stage is published)."""
from __future__ import annotations

import logging

from bridge.records import Hop, Sample, State
from protocol.lifecycle import HopKind, Phase

__all__ = ["start_round", "mint_more", "MINT_CHUNK"]

log = logging.getLogger("bridge.rounds")

MINT_CHUNK = 512  # samples minted at a time; refilled when stage 0's pool runs low


def start_round(st: State, r: int, now: float) -> None:
    """Mint samples [r*N, (r+1)*N) with their stage-0 forwards, reset every miner's step; the
    run is done once `total_rounds` rounds trained something (rounds that completed no sample do
    not count, `empty_rounds`)."""
    if r - st.empty_rounds >= st.run.total_rounds:
        if st.phase == Phase.MERGE:
            _archive(st)
        st.phase = Phase.DONE
        st.events.append(("run_done", r))
        log.info("run %s done after %d rounds%s", st.run.run_id, r,
                 f" ({st.empty_rounds} of them trained nothing)" if st.empty_rounds else "")
        return
    if st.phase == Phase.MERGE:
        _archive(st)
    n, s = st.run.samples_per_round, st.run.n_stages
    st.round_states = [dict(vars(x)) for x in st.stage_states]
    st.phase, st.round, st.merge_started = Phase.TRAIN, r, 0.0
    st.r_completed = st.r_abandoned = 0
    st.fwd_pending = [n] * s
    st.workers, st.pseudograds, st.frozen, st.votes, st.published = {}, {}, {}, {}, {}
    st.vote_deadline, st.disputes, st.report_grace = {}, {}, {}
    st.flagged, st.unpaid = [], []
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
    items = [dict(hotkey=h, stage=s, **st.pseudograds[s][h])
             for s in sorted(st.frozen) for h in st.frozen[s]]
    cast = [dict(hotkey=h, stage=s, sha256=v["sha256"])
            for s in sorted(st.votes) for h, v in sorted(st.votes[s].items())]
    st.archive_round(st.round, {"round": st.round, "states": st.round_states,
                                 "pseudograds": items, "votes": cast, "flagged": list(st.flagged),
                                 "completed_before": st.completed_total - st.r_completed,
                                 "unpaid": list(st.unpaid)})
