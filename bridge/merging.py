"""A round's merge across the bridge's state: one `StageMerge` per stage (bridge.stage_merge), what
the rest of the state learns when one is done, and what readers ask of them. Pure: time is an
argument; the I/O shell (bridge.merge_api) checks and copies objects first.

- `open_round` at the round's close: a record per stage with the replicas that worked.
- Reports, votes and arbitrations are entitlement-checked here (registered, merging, not
  quarantined, verified work) and applied to the stage's record; `advance` applies what time and
  who is awaited decide. When a record is done, its flagged voters are noted and, when its state
  ballot decided one, the stage's published state changes (`_finish`); bridge.rounds starts the
  next round once every stage's record is done.
- Readers (`view`, disputes) look at a copy advanced to `now`: a read never writes, and sees
  exactly what the next write will record (every deadline is the time its condition held).
- Records are kept from `keep_from` (the audit window, and back to each stage's checkpoint):
  the decided updates since a checkpoint are what a joiner replays (`updates_since`).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

from bridge import ballot
from bridge import stage_merge as sm
from bridge.ballot import Cast, Decision
from bridge.records import Miner, StageState, State, TransitionError
from bridge.stage_merge import Report, Rules, StageMerge, merge_id
from protocol.lifecycle import Phase
from protocol.sync_plan import sync_plan

__all__ = ["record_of", "member", "merging_record", "view", "open_round", "waiting", "advance", "all_done",
           "check_entitled", "check_report", "report", "vote_shards", "vote_state", "arbitrate_shard", "arbitrate_state",
           "shard_disputes", "state_disputes", "update_of", "updates_since", "published_round", "keep_from",
           "prune", "item_of", "archive_items"]

log = logging.getLogger(__name__)


def record_of(st: State, round_: int, stage: int) -> Optional[StageMerge]:
    """The merge of (round, stage), if it exists and is kept."""
    return st.merges.get(merge_id(round_, stage))


def member(st: State, hotkey: str, round_: int) -> Miner:
    """The registered miner `hotkey`, when round `round_` is the one merging (409 otherwise)."""
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("not_registered", f"hotkey {hotkey} is not registered")
    if st.phase != Phase.MERGE or round_ != st.round:
        raise TransitionError("not_merging", f"round {round_} is not merging (run at round {st.round}, {st.phase})")
    return m


def merging_record(st: State, hotkey: str, round_: int) -> tuple[Miner, StageMerge]:
    """(miner, its stage's merge) of the merging round (409 not_merging otherwise)."""
    m = member(st, hotkey, round_)
    return m, st.merges[merge_id(round_, m.stage)]


def view(st: State, round_: int, stage: int, now: float) -> Optional[StageMerge]:
    """A detached copy of (round, stage)'s merge as it stands at `now` (nothing is written)."""
    m = record_of(st, round_, stage)
    if m is None:
        return None
    copy = StageMerge.from_row(m.row())
    if round_ == st.round and st.phase == Phase.MERGE and not copy.done:
        sm.advance(copy, now, waiting(st, m), Rules.of(st.run))
    return copy


def open_round(st: State, now: float) -> None:
    """The round closed: one merge per stage, awaiting the replicas that worked in it."""
    plan = sync_plan(st.run)
    for s in range(st.run.n_stages):
        workers = [m.hotkey for m in st.stage_miners(s) if m.round_steps > 0 or m.step_samples > 0]
        st.merges[merge_id(st.round, s)] = sm.open_merge(st.round, s, workers, now, plan.checkpoint_due(st.round))


def waiting(st: State, m: StageMerge) -> list[str]:
    """Workers whose report the merge still awaits: not reported, registered, not quarantined, and
    with verified work since their last registration (nobody waits for one that cannot report)."""
    return [h for h in m.workers if h not in m.reports and h in st.miners
            and not st.quarantined(st.miners[h]) and st.miners[h].round_samples > 0]


def _step(st: State, m: StageMerge, fn: Any) -> Any:
    """Run a transition of one record; note what the state learns if it finished the record."""
    was = m.done
    out = fn(waiting(st, m), Rules.of(st.run))
    if m.done and not was:
        _finish(st, m)
    return out


def advance(st: State, now: float) -> None:
    """Apply time to every stage's merge of the merging round."""
    if st.phase != Phase.MERGE:
        return
    for s in range(st.run.n_stages):
        m = record_of(st, st.round, s)
        if m is not None and not m.done:
            _step(st, m, lambda w, r: sm.advance(m, now, w, r))


def all_done(st: State) -> bool:
    """Whether every stage's merge of the merging round is done (the next round may start)."""
    return all((m := record_of(st, st.round, s)) is not None and m.done for s in range(st.run.n_stages))


def _finish(st: State, m: StageMerge) -> None:
    flagged = (m.shards.flagged if m.shards else []) + (m.state.flagged if m.state else [])
    for h in flagged:
        if h not in st.flagged:
            st.flagged.append(h)
            if h in st.miners:
                st.miners[h].disagreements += 1
    decided = ballot.decisions(m.state)[0] if m.state is not None else None
    if decided is not None:
        st.stage_states[m.stage] = StageState(round=m.round + 1, key=decided.key, sha256=decided.sha256,
                                              size=decided.size, alt_keys=list(decided.alt_keys))
    kept = sum(d is None for d in update_of(st, m) or [])
    st.events.append(("published", (m.round, m.stage)))
    log.info("round %d stage %d merged: %d replica(s), %d shard(s) kept%s", m.round, m.stage, len(m.frozen), kept,
             f"; state for round {m.round + 1} published ({decided.sha256[:12]})" if decided else "")


def check_entitled(st: State, miner: Miner, m: StageMerge) -> None:
    """Refuse a replica that may not enter the merge set `m` (as it stands): quarantined, no work
    this round, no verified backward since its last registration, or the set already frozen."""
    if st.quarantined(miner):
        raise TransitionError("quarantined", f"{miner.hotkey} failed an audit and sits out merges "
                              f"until round {miner.quarantined_until}")
    if miner.hotkey not in m.workers:
        raise TransitionError("no_work", f"{miner.hotkey} did no work in round {m.round}")
    if miner.round_samples <= 0:
        raise TransitionError("no_work", f"{miner.hotkey} has no verified backward in round {m.round} since "
                              f"its last registration (epoch {miner.epoch}): nothing of it can be merged")
    sm.need_collecting(m)


def check_report(st: State, hotkey: str, round_: int, rep: Report, m: Optional[StageMerge] = None) -> bool:
    """Whether `hotkey` may enter `rep` in its stage's merge set now (True: it repeats the recorded
    one); refuses before anything is copied. A replica counts only the backwards verified since its
    last registration: with none, it has no verified work to merge and earns no credit. `m`: the
    record to check against (a read's copy advanced to now; default the live one)."""
    miner, live = merging_record(st, hotkey, round_)
    m = live if m is None else m
    if sm.repeat_of(m, hotkey, rep):
        return True
    check_entitled(st, miner, m)
    return False


def report(st: State, hotkey: str, round_: int, shas: Sequence[str], sizes: Sequence[int], now: float) -> None:
    """Enter a replica's pseudo-gradient (its pieces already sealed) in the merge set; its weight is
    the bridge's own count of its verified backwards, never a claim (the same report twice: no-op)."""
    miner, m = merging_record(st, hotkey, round_)
    rep = Report(miner.round_samples, miner.epoch, tuple(shas), tuple(sizes))
    if check_report(st, hotkey, round_, rep):
        return
    _step(st, m, lambda w, r: sm.add_report(m, hotkey, rep, w, now, r))


def vote_shards(st: State, hotkey: str, round_: int, votes: Sequence[tuple[int, Cast]],
                now: float) -> dict[int, Optional[bool]]:
    """Record a merger's checked (shard, vote) pairs; {shard: agrees, None: undecided}."""
    _, m = merging_record(st, hotkey, round_)
    return {s: _step(st, m, lambda w, r, s=s, v=v: sm.vote_shard(m, hotkey, s, v, now, w, r)) for s, v in votes}


def vote_state(st: State, hotkey: str, round_: int, vote: Cast, now: float) -> Optional[bool]:
    """Record a member's vote on the full state of a checkpoint round; whether it agrees with the
    decision (None: undecided yet)."""
    _, m = merging_record(st, hotkey, round_)
    return _step(st, m, lambda w, r: sm.vote_state(m, hotkey, vote, now, w, r))


def _disputed(st: State, round_: int, stage: int) -> StageMerge:
    if round_ != st.round or st.phase != Phase.MERGE or not 0 <= stage < st.run.n_stages:
        raise TransitionError("no_dispute", f"round {round_} stage {stage} is not in dispute")
    return st.merges[merge_id(round_, stage)]


def arbitrate_shard(st: State, validator: str, round_: int, stage: int, shard: int, sha256: str,
                    now: float) -> bool:
    """A validator's recomputation settles a disputed shard; whether a merger agreed."""
    m = _disputed(st, round_, stage)
    agreed = _step(st, m, lambda w, r: sm.arbitrate_shard(m, shard, sha256, now, w, r))
    log.warning("round %d stage %d shard %d: validator %s recomputed %s; %s", round_, stage, shard,
                validator[:10], sha256[:12], "a merger agreed" if agreed else "no merger agreed: the shard is kept")
    return agreed


def arbitrate_state(st: State, validator: str, round_: int, stage: int, sha256: str, now: float) -> bool:
    """A validator's recomputation settles a disputed checkpoint; whether a voter agreed."""
    m = _disputed(st, round_, stage)
    agreed = _step(st, m, lambda w, r: sm.arbitrate_state(m, sha256, now, w, r))
    log.warning("round %d stage %d: validator %s recomputed the state %s; %s", round_, stage, validator[:10],
                sha256[:12], "publishing the agreeing voters' state" if agreed else "no voter agrees: kept")
    return agreed


def _current_views(st: State, now: float) -> list[StageMerge]:
    if st.phase != Phase.MERGE:
        return []
    return [v for s in range(st.run.n_stages) if (v := view(st, st.round, s, now)) is not None]


def shard_disputes(st: State, now: float) -> list[dict[str, Any]]:
    """Disputed shards of the merging round, as of `now`."""
    return [{"round": v.round, "stage": v.stage, "shard": s, "deadline": t}
            for v in _current_views(st, now) if v.shards is not None for s, t in ballot.disputed(v.shards)]


def state_disputes(st: State, now: float) -> list[dict[str, Any]]:
    """Disputed checkpoints of the merging round, as of `now`, with their sets and votes."""
    out = []
    for v in _current_views(st, now):
        if v.state is None or v.done:
            continue
        for _, t in ballot.disputed(v.state):
            start = StageState(**st.round_states[v.stage]) if st.round_states else StageState()
            out.append({"round": v.round, "stage": v.stage, "deadline": t, "start": start,
                        "items": [item_of(v.stage, h, r) for h, r in v.items()], "votes": ballot.voted(v.state, 0)})
    return out


def update_of(st: State, m: StageMerge) -> Optional[list[Optional[Decision]]]:
    """The round's decided update of a stage per shard (None: kept), or None while undecided."""
    if m.shards is None:
        return [None] * sync_plan(st.run).shards if m.done else None
    return ballot.decisions(m.shards) if ballot.complete(m.shards) else None


def keep_from(st: State) -> int:
    """The oldest round whose merge is kept: the audit window back from the current round, and back
    to each stage's last checkpoint (the updates since it are what catch-up replays)."""
    horizon = st.round - (st.run.audit_window_rounds + 2)
    return min([horizon] + [ss.round for ss in st.stage_states])


def _keep_from(st: State, stage: int) -> int:
    return min(st.round - (st.run.audit_window_rounds + 2), st.stage_states[stage].round)


def updates_since(st: State, stage: int, first: int, end: int) -> list[list[Optional[Decision]]]:
    """The decided updates of rounds first..end-1 (409 `updates_pruned` when one is no longer kept)."""
    out, missing = [], []
    for r in range(first, end):
        m = record_of(st, r, stage)
        upd = None if m is None or r < _keep_from(st, stage) else update_of(st, m)
        if upd is None:
            missing.append(r)
        else:
            out.append(upd)
    if missing:
        raise TransitionError("updates_pruned", f"stage {stage}: the updates of rounds {missing[:5]} are not "
                              "kept; load a later checkpoint")
    return out


def published_round(st: State, stage: int) -> int:
    """The round a stage's decided updates reach (its checkpoint's round before any; -1: none)."""
    done = [m.round for m in st.merges.values() if m.stage == stage and update_of(st, m) is not None]
    if done:
        return max(done) + 1
    ss = st.stage_states[stage]
    return ss.round if ss.sha256 else -1


def prune(st: State) -> None:
    """Forget the merges older than keep_from (their rows stay on disk, never loaded again)."""
    floor = keep_from(st)
    for k in [k for k, m in st.merges.items() if m.round < floor]:
        del st.merges[k]


def item_of(stage: int, hotkey: str, r: Report) -> dict[str, Any]:
    """A merge-set entry as the archive, the hop log and the view show it."""
    return {"hotkey": hotkey, "stage": stage, "sha256": r.sha256, "size": sum(r.sizes), "samples": r.samples,
            "epoch": r.epoch, "shas": list(r.shas)}


def archive_items(st: State) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(merge-set items, full-state votes) of the merging round, for its archive row."""
    merges = [m for s in range(st.run.n_stages) if (m := record_of(st, st.round, s)) is not None]
    items = [item_of(m.stage, h, r) for m in merges for h, r in m.items()]
    votes = [{"hotkey": h, "stage": m.stage, "sha256": sha} for m in merges if m.state is not None
             for h, sha in ballot.voted(m.state, 0).items()]
    return items, votes
