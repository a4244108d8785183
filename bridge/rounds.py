"""Round transitions: start (mint samples), sample end, close -> merge, merge-set freeze,
pseudo-gradient reports, late repeats, and object keys (votes on the merged state: bridge.votes).

Keys: a replica PUTs to its own staging key (`.../upload/{hotkey}/...`); when it reports, the
bridge copies the object to a final key nobody holds a grant for, so what was reported is
what every reader gets (write-once)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge import votes
from bridge.records import Hop, Sample, StageState, State, TransitionError
from protocol.keys import PseudogradKey, StateKey, staging_of
from protocol.lifecycle import HopKind, Phase, SampleStatus

__all__ = ["start_round", "mint_more", "MINT_CHUNK", "finish_sample", "drop_graph",
           "maybe_freeze", "merge_upload_key", "final_key", "check_upload_key",
           "check_report", "report_pseudograd", "record_pseudograd", "merge_set", "moved_on", "published_state",
           "check_archived_pseudograd"]

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
    st.phase, st.round, st.merge_started = Phase.TRAIN, r, 0.0
    st.r_completed = st.r_abandoned = 0
    st.fwd_pending = [n] * s
    st.workers, st.pseudograds, st.frozen, st.votes, st.published = {}, {}, {}, {}, {}
    st.vote_deadline, st.disputes, st.report_grace = {}, {}, {}
    st.flagged = []
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
                                 "completed_before": st.completed_total - st.r_completed})


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
    st.phase, st.merge_started = Phase.MERGE, now
    for s in range(st.run.n_stages):
        st.workers[s] = [m.hotkey for m in st.stage_miners(s)
                         if m.round_steps > 0 or m.step_samples > 0]
    st.events.append(("round_close", st.round))
    log.info("round %d closed: %d completed, %d abandoned; merge begins", st.round,
             st.r_completed, st.r_abandoned)
    maybe_freeze(st, now)


def maybe_freeze(st: State, now: float) -> None:
    """Freeze each stage's merge set once its workers reported, the report grace after half of
    them reported ended, or the merge timeout passed; then apply the vote deadlines."""
    timed_out = now >= st.merge_started + st.run.merge_timeout_seconds
    for s in range(st.run.n_stages):
        if st.phase != Phase.MERGE:
            return  # a publish below completed the round: the next one began
        if s in st.frozen:
            if not st.published.get(s):
                _on_time(st, s, now)
            continue
        reported = st.pseudograds.get(s, {})
        workers = st.workers.get(s, [])
        # a quarantined worker, or one with no verified backward since it registered again,
        # cannot enter the set: nobody waits for it
        waiting = [h for h in workers if h not in reported and h in st.miners
                   and not st.quarantined(st.miners[h]) and st.miners[h].round_samples > 0]
        if waiting and 2 * len(reported) >= len(workers) and s not in st.report_grace:
            # half the workers reported: the rest get vote_timeout_seconds more, so one that
            # withholds its report cannot hold the stage for the whole merge timeout
            st.report_grace[s] = now + min(st.run.vote_timeout_seconds, st.run.merge_timeout_seconds)
        if timed_out or not waiting or now >= st.report_grace.get(s, float("inf")):
            st.frozen[s] = sorted(reported)
            st.vote_deadline[s] = now + st.run.vote_timeout_seconds
            log.info("round %d stage %d merge set frozen with %d items%s", st.round, s,
                     len(st.frozen[s]), " (timeout)" if timed_out else "")
            if not st.frozen[s]:
                votes.publish(st, s, [], now)  # no work: the stage keeps its previous state


def _on_time(st: State, stage: int, now: float) -> None:
    if st.run.sync_mode == "sharded":
        from bridge import shard_round  # the sharded sync decides shard by shard first
        shard_round.on_time(st, stage, now)
    else:
        votes.on_time(st, stage, now)


def _merge_key(st: State, stage: int, hotkey: str, round_: int, kind: str,
               sha256: str) -> PseudogradKey | StateKey:
    """The typed key of a replica's merge upload: its pseudo-gradient of `round_`, or the state it
    merged for round `round_ + 1`."""
    if kind == "pseudograd":
        return PseudogradKey(st.run.run_id, round_, stage, hotkey, sha256)
    return StateKey(st.run.run_id, round_ + 1, stage, hotkey, sha256)


def merge_upload_key(st: State, hotkey: str, round_: int, kind: str, sha256: str) -> str:
    """The staging key a replica may PUT its pseudo-gradient or merged state to (its own). In a
    sharded run only a checkpoint's state goes this way (the pieces have their own routes)."""
    m = _member(st, hotkey, round_)
    if st.run.sync_mode == "sharded":
        if kind == "pseudograd":
            raise TransitionError("sharded_run", "this run syncs shard by shard (sync_mode: sharded): "
                                  "upload and report the pseudo-gradient's pieces through the sync routes")
        from bridge.shard_round import need_checkpoint_vote
        need_checkpoint_vote(st, m.stage, round_)
    return _merge_key(st, m.stage, hotkey, round_, kind, sha256).staging


def final_key(st: State, hotkey: str, round_: int, kind: str, sha256: str) -> str:
    """Where the bridge copies a reported upload: no miner ever holds a PUT grant for it."""
    return _merge_key(st, _member(st, hotkey, round_).stage, hotkey, round_, kind, sha256).final


def check_upload_key(st: State, hotkey: str, round_: int, kind: str, key: str,
                     sha256: str) -> str:
    """The final key for a report naming staging `key`; 400 bad_key for any other key, before
    anything looks at the store (the answer never depends on which objects exist)."""
    if key != merge_upload_key(st, hotkey, round_, kind, sha256):
        raise TransitionError("bad_key", f"key {key[:200]!r} is not your {kind} upload key "
                              f"for this sha256 (ask POST /v1/rounds/upload for it)")
    return final_key(st, hotkey, round_, kind, sha256)


def _member(st: State, hotkey: str, round_: int) -> Any:
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("not_registered", f"hotkey {hotkey} is not registered")
    if st.phase != Phase.MERGE or round_ != st.round:
        raise TransitionError("not_merging",
                              f"round {round_} is not merging (run at round {st.round}, {st.phase})")
    return m


def check_report(st: State, hotkey: str, round_: int, sha256: str) -> bool:
    """Whether `hotkey` may enter a pseudo-gradient of `sha256` in the merge set now (True: it
    is a repeat of the recorded one); refuses before anything is copied. A replica counts only
    the backwards verified since its last registration: with none (it registered again after its
    work, or every one was rejected) it has no verified work to merge and earns no credit."""
    m = _member(st, hotkey, round_)
    have = st.pseudograds.get(m.stage, {}).get(hotkey)
    if have is not None:
        if have["sha256"] == sha256:
            return True
        raise TransitionError("already_reported", "a different pseudo-gradient was reported")
    if st.quarantined(m):
        raise TransitionError("quarantined", f"{hotkey} failed an audit and sits out merges "
                              f"until round {m.quarantined_until}")
    if hotkey not in st.workers.get(m.stage, []):
        raise TransitionError("no_work", f"{hotkey} did no work in round {round_}")
    if m.round_samples <= 0:
        raise TransitionError("no_work", f"{hotkey} has no verified backward in round {round_} since "
                              f"its last registration (epoch {m.epoch}): nothing of it can be merged")
    if m.stage in st.frozen:
        raise TransitionError("frozen", f"stage {m.stage} merge set is already frozen")
    return False


def report_pseudograd(st: State, hotkey: str, round_: int, key: str, sha256: str, size: int,
                      now: float) -> None:
    """Record a replica's whole pseudo-gradient (already copied to its final `key`); 409
    `sharded_run` in a sharded run, where pieces are reported shard by shard."""
    if st.run.sync_mode == "sharded":
        raise TransitionError("sharded_run", "this run syncs shard by shard (sync_mode: sharded): "
                              "report the pseudo-gradient's pieces through the sync routes")
    record_pseudograd(st, hotkey, round_, key, sha256, size, now)


def record_pseudograd(st: State, hotkey: str, round_: int, key: str, sha256: str, size: int,
                      now: float, extra: Optional[dict[str, Any]] = None) -> None:
    """Enter a pseudo-gradient (with `extra` fields: a sharded one's pieces) in the merge set.
    Its weight is the bridge's own count of the replica's verified backwards, never a claim
    (same report twice: no-op)."""
    m = _member(st, hotkey, round_)
    if key != final_key(st, hotkey, round_, "pseudograd", sha256):
        raise TransitionError("bad_key", f"key {key[:200]!r} is not this pseudo-gradient's key")
    if check_report(st, hotkey, round_, sha256):
        return
    st.pseudograds.setdefault(m.stage, {})[hotkey] = {
        "key": key, "sha256": sha256, "size": size, "samples": m.round_samples, "epoch": m.epoch,
        **(extra or {})}
    maybe_freeze(st, now)


def merge_set(st: State, round_: int, stage: int) -> list[dict[str, Any]]:
    """The frozen merge set of a stage in fixed (hotkey) order; 409 until frozen."""
    if round_ != st.round or st.phase != Phase.MERGE:
        raise TransitionError("not_merging", f"round {round_} is not merging")
    if not 0 <= stage < st.run.n_stages:
        raise TransitionError("unknown_stage", f"stage {stage} does not exist")
    if stage not in st.frozen:
        raise TransitionError("not_frozen", f"stage {stage} merge set is not frozen yet")
    return [dict(hotkey=h, stage=stage, **st.pseudograds[stage][h]) for h in st.frozen[stage]]


def moved_on(st: State, round_: int) -> bool:
    """True when round `round_`'s merge is over: every stage published and the run moved on."""
    return round_ < st.round or (round_ == st.round and st.phase == Phase.DONE)


def published_state(st: State, hotkey: str, round_: int, sha256: str, key: str,
                    archive_next: Optional[dict[str, Any]]) -> tuple[int, StageState]:
    """(stage, state published at the end of `round_`) for a late merged report by `hotkey`;
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


def check_archived_pseudograd(archive: Optional[dict[str, Any]], hotkey: str, round_: int,
                              key: str, sha256: str, size: int) -> None:
    """Accept a late repeat of a pseudo-gradient report that is in the round's frozen merge
    set exactly as reported (`key`: the staging key it names); anything else is refused (409)."""
    for item in (archive or {}).get("pseudograds", []):
        if item["hotkey"] == hotkey and staging_of(item["key"]) == key:
            if (item["sha256"], item["size"]) == (sha256, size):
                return
            raise TransitionError("already_reported",
                                  "a different pseudo-gradient was reported for this round")
    raise TransitionError("not_merging", f"round {round_} is over and its merge set does "
                          f"not hold this pseudo-gradient from {hotkey}")
