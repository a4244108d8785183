"""Screening of every merge input a peer controls, before the store is touched (pure, read-only:
the I/O shell calls these on the state as it stands at `now`, then copies objects, then applies
the transition, which checks again).

A grant, a pieces report, a vote or a full-state upload is refused here when its round is not the
merging one, its shard index is outside 0..shards-1, its size is not the exact size of that
shard's object (bridge.syncspec), its writer may not report pieces (quarantined, no verified work,
set frozen) or does not merge that shard, or it would change a vote already cast. So a refused
request never leaves an object at a write-once final key and costs no store access, however many
arrive. Each check answers the typed final key (protocol.keys) the object will be sealed at.
"""
from __future__ import annotations

from typing import Optional, Sequence

from bridge import ballot, merging
from bridge.ballot import KEEP_SHA
from bridge.records import Miner, State, TransitionError
from bridge.stage_merge import MergePhase, Report, StageMerge
from protocol.keys import PieceKey, StateKey, UpdateKey
from protocol.lifecycle import Phase
from protocol.sync_plan import sync_plan

__all__ = ["piece_size", "update_size", "check_shard", "check_grant", "check_pieces", "check_votes",
           "check_state_grant", "check_state_report", "recorded_state_vote", "recorded_keys"]


def piece_size(st: State, stage: int, shard: int) -> Optional[int]:
    """Exact bytes of a pseudo-gradient piece of (stage, shard) (None: sizes unchecked, pure tests)."""
    spec = st.tun.sync
    return None if spec is None else spec.pieces[stage][shard]


def update_size(st: State, stage: int, shard: int) -> Optional[int]:
    """Exact bytes of a merged update of (stage, shard) (None: unchecked)."""
    spec = st.tun.sync
    return None if spec is None else spec.updates[stage][shard]


def check_shard(st: State, shard: int) -> None:
    """400 `bad_shard` unless 0 <= shard < the run's shard count."""
    n = sync_plan(st.run).shards
    if not 0 <= shard < n:
        raise TransitionError("bad_shard", f"shard {shard} is not in 0..{n - 1}")


def _check_size(st: State, stage: int, shard: int, kind: str, size: int) -> None:
    want = piece_size(st, stage, shard) if kind == "pg" else update_size(st, stage, shard)
    if size < 1 or size > st.run.max_state_bytes:
        raise TransitionError("bad_size", f"shard {shard}: size {size} is not in 1..max_state_bytes")
    if want is not None and size != want:
        raise TransitionError("bad_size", f"shard {shard} of stage {stage}: a {'piece' if kind == 'pg' else 'merged update'} "
                              f"of this run is exactly {want} bytes, not {size}")


def _merging(st: State, caller: str, round_: int, now: float) -> tuple[Miner, StageMerge]:
    """(caller, its stage's merge as it stands at `now`) of the merging round."""
    miner = merging.member(st, caller, round_)
    return miner, merging.view(st, round_, miner.stage, now)


def _shards(m: StageMerge) -> ballot.Ballot:
    if m.phase == MergePhase.COLLECTING:
        raise TransitionError("not_frozen", f"stage {m.stage} merge set is not frozen yet")
    if m.shards is None:
        raise TransitionError("not_a_merger", f"stage {m.stage}'s merge set of round {m.round} is empty")
    return m.shards


def check_grant(st: State, caller: str, round_: int, kind: str, shard: int, sha: str, size: int,
                now: float) -> PieceKey | UpdateKey:
    """The final key a PUT grant of one shard object leads to, or the refusal: pieces only from a
    replica that may report them (or re-sends the one it reported), merged updates only from a
    merger of that shard that has not voted another."""
    miner, m = _merging(st, caller, round_, now)
    check_shard(st, shard)
    _check_size(st, miner.stage, shard, kind, size)
    run = st.run.run_id
    if kind == "pg":
        rep = m.reports.get(caller)
        if rep is None:
            merging.check_entitled(st, miner, m)
        elif rep.shas[shard] != sha:
            raise TransitionError("already_reported", "a different pseudo-gradient was reported")
        return PieceKey(run, round_, miner.stage, caller, shard, sha)
    ballot.check_cast(_shards(m), caller, shard, sha)
    return UpdateKey(run, round_, miner.stage, shard, caller, sha)


def check_pieces(st: State, caller: str, round_: int, shas: Sequence[str], sizes: Sequence[int],
                 now: float) -> tuple[list[PieceKey], bool]:
    """(final key per shard, whether it repeats the recorded report) for a pieces report; refuses a
    wrong count, a wrong size or a replica that may not report."""
    miner, m = _merging(st, caller, round_, now)
    n = sync_plan(st.run).shards
    if len(shas) != n or len(sizes) != len(shas):
        raise TransitionError("bad_shards", f"{len(shas)} shard sha256s and {len(sizes)} sizes; "
                              f"the run has {n} shard(s)")
    for s, size in enumerate(sizes):
        _check_size(st, miner.stage, s, "pg", size)
    repeat = merging.check_report(st, caller, round_, Report(miner.round_samples, miner.epoch, tuple(shas),
                                                              tuple(sizes)), m)
    return [PieceKey(st.run.run_id, round_, miner.stage, caller, s, h) for s, h in enumerate(shas)], repeat


def check_votes(st: State, caller: str, round_: int, votes: Sequence[tuple[int, str, int]],
                now: float) -> list[UpdateKey]:
    """The final key per (shard, sha256, size) vote (none is copied for "keep"); refuses a shard out
    of range or voted twice, a caller that does not merge it, a wrong size, or a changed vote."""
    miner, m = _merging(st, caller, round_, now)
    b = _shards(m)
    seen: set[int] = set()
    finals = []
    for shard, sha, size in votes:
        check_shard(st, shard)
        if shard in seen:
            raise TransitionError("bad_shard", f"shard {shard} is voted twice in one request")
        seen.add(shard)
        ballot.check_cast(b, caller, shard, sha)
        if sha == KEEP_SHA:
            if size != 0:
                raise TransitionError("bad_size", f"shard {shard}: a 'keep' vote (the empty object) has size 0")
        else:
            _check_size(st, miner.stage, shard, "merged", size)
        finals.append(UpdateKey(st.run.run_id, round_, miner.stage, shard, caller, sha))
    return finals


def _checkpoint(m: StageMerge) -> None:
    if not m.checkpoint:
        raise TransitionError("not_checkpoint", f"round {m.round} ends with no checkpoint: its update is "
                              "voted shard by shard")
    if m.phase in (MergePhase.COLLECTING, MergePhase.VOTING):
        raise TransitionError("not_decided", f"stage {m.stage}'s shards of round {m.round} are not all "
                              "decided yet: vote the checkpoint once they are")


def check_state_grant(st: State, caller: str, round_: int, sha: str, now: float) -> StateKey:
    """The key of a full state the caller may upload now: a checkpoint round whose shards are decided."""
    miner, m = _merging(st, caller, round_, now)
    _checkpoint(m)
    return StateKey(st.run.run_id, round_ + 1, miner.stage, caller, sha)


def check_state_report(st: State, caller: str, round_: int, key: str, sha: str, now: float) -> StateKey:
    """The key of a reported full state; 400 `bad_key` unless `key` is the caller's staging key for
    it, before anything looks at the store (the answer never depends on which objects exist)."""
    want = check_state_grant(st, caller, round_, sha, now)
    if key != want.staging:
        raise TransitionError("bad_key", f"key {key[:200]!r} is not your state upload key for this sha256 "
                              "(ask POST /v1/rounds/upload for it)")
    return want


def recorded_state_vote(st: State, caller: str, round_: int, sha: str) -> Optional[int]:
    """The size of `caller`'s recorded full-state vote for `sha` in the merging round (None: none)."""
    m = st.miners.get(caller)
    rec = None if m is None or st.phase != Phase.MERGE else merging.record_of(st, round_, m.stage)
    cast = None if rec is None or rec.state is None else rec.state.votes[0].get(caller)
    return cast.size if cast is not None and cast.sha256 == sha else None


def recorded_keys(st: State, round_: int, stage: int) -> set[str]:
    """Every final key a kept merge of (round, stage) holds a vote for (these must stay)."""
    m = merging.record_of(st, round_, stage)
    if m is None:
        return set()
    return {c.key for b in (m.shards, m.state) if b is not None for votes in b.votes for c in votes.values()}
