"""Round transitions: sample end, close -> merge, merge-set freeze and the vote deadlines (the top
of the merge: it drives bridge.votes and bridge.shard_round, which never import it back),
pseudo-gradient reports (whole or in pieces), late repeats. The round's start is bridge.round_start,
who may report and under which keys bridge.merge_rules (re-exported here)."""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge import shard_checks, shard_round, votes
from bridge.merge_rules import (check_report, check_upload_key, final_key, member, merge_upload_key,
                                pieces_sha, sharded)
from bridge.records import Sample, StageState, State, TransitionError
from protocol.keys import StateKey, staging_of
from protocol.lifecycle import Phase, SampleStatus

__all__ = ["finish_sample", "drop_graph",
           "maybe_freeze", "merge_upload_key", "final_key", "check_upload_key",
           "check_report", "report_pseudograd", "record_pseudograd", "report_pieces", "merge_set", "moved_on", "published_state",
           "check_archived_pseudograd"]

log = logging.getLogger(__name__)


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
    if st.r_completed == 0:
        _note_empty_round(st)
    st.phase, st.merge_started = Phase.MERGE, now
    for s in range(st.run.n_stages):
        st.workers[s] = [m.hotkey for m in st.stage_miners(s)
                         if m.round_steps > 0 or m.step_samples > 0]
    st.events.append(("round_close", st.round))
    log.info("round %d closed: %d completed, %d abandoned; merge begins", st.round,
             st.r_completed, st.r_abandoned)
    maybe_freeze(st, now)


def _note_empty_round(st: State) -> None:
    """A round that completed no sample trained nothing end to end: say so loudly; it does not
    count towards the run's rounds (start_round), so the run never ends `done` having trained
    nothing."""
    reasons = {}
    for s in st.samples.values():
        if s.status == SampleStatus.ABANDONED:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    st.empty_rounds += 1
    top = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
    st.last_empty = {"round": st.round, "abandoned": st.r_abandoned, "reasons": top}
    log.error("round %d trained NOTHING: all %d samples were abandoned (%s); it does not count "
              "towards the run's %d rounds (%d such rounds so far). Check the miners' logs "
              "(out of memory? unreachable storage?)", st.round, st.r_abandoned,
              "; ".join(f"{n} x {r}" for r, n in top.items()) or "no reason recorded",
              st.run.total_rounds, st.empty_rounds)


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
                   and not st.quarantined(st.miners[h], now) and st.miners[h].round_samples > 0]
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
                if sharded(st):
                    shard_round.keep_round(st, s)
                votes.publish(st, s, [], now)  # no work: the stage keeps its previous state
            elif sharded(st):
                shard_round.ballot(st, st.round, s, now)  # opened with the freeze: views only read it


def _on_time(st: State, stage: int, now: float) -> None:
    if sharded(st):
        shard_round.on_time(st, stage, now)
    else:
        votes.on_time(st, stage, now)


def report_pseudograd(st: State, hotkey: str, round_: int, key: str, sha256: str, size: int,
                      now: float) -> None:
    """Record a replica's whole pseudo-gradient (already copied to its final `key`); 409
    `sharded_run` in a sharded run, where pieces are reported shard by shard."""
    if sharded(st):
        raise TransitionError("sharded_run", "this run syncs shard by shard (sync_mode: sharded): "
                              "report the pseudo-gradient's pieces through the sync routes")
    record_pseudograd(st, hotkey, round_, key, sha256, size, now)


def record_pseudograd(st: State, hotkey: str, round_: int, key: str, sha256: str, size: int,
                      now: float, extra: Optional[dict[str, Any]] = None) -> None:
    """Enter a pseudo-gradient (with `extra` fields: a sharded one's pieces) in the merge set.
    Its weight is the bridge's own count of the replica's verified backwards, never a claim
    (same report twice: no-op)."""
    m = member(st, hotkey, round_)
    if key != final_key(st, hotkey, round_, "pseudograd", sha256):
        raise TransitionError("bad_key", f"key {key[:200]!r} is not this pseudo-gradient's key")
    if check_report(st, hotkey, round_, sha256, now):
        return
    st.pseudograds.setdefault(m.stage, {})[hotkey] = {
        "key": key, "sha256": sha256, "size": size, "samples": m.round_samples, "epoch": m.epoch,
        **(extra or {})}
    maybe_freeze(st, now)


def report_pieces(st: State, hotkey: str, round_: int, shas: list[str], sizes: list[int],
                  finals: list[str], now: float) -> None:
    """Enter a replica's sharded pseudo-gradient (shards already at `finals`) in the merge set."""
    sha = pieces_sha(shas)
    want, _ = shard_checks.check_pieces(st, hotkey, round_, shas, sizes, sha)
    if list(finals) != want:
        raise TransitionError("bad_key", "the pieces' keys are not their final keys")
    key = final_key(st, hotkey, round_, "pseudograd", sha)
    record_pseudograd(st, hotkey, round_, key, sha, sum(sizes), now,
                      extra={"shards": list(shas), "sizes": list(sizes), "finals": list(finals)})


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
