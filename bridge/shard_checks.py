"""Screening of every input a peer controls in the sharded sync, before the store is touched
(pure, read-only: the I/O shell calls these under the lock, then copies objects, then applies
the transition, which checks again).

A grant, a pieces report or a vote is refused here when its round is not the merging one, its
shard index is outside 0..sync_shards-1, its size is not the exact size of that shard's object
(bridge.syncspec), its writer may not report pieces (quarantined, no verified work, set frozen)
or does not merge that shard, or it would change a vote already cast. So a refused request never
leaves an object at a write-once final key and costs no store access, however many arrive.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from bridge.merge_rules import check_report, member, need_sharded
from bridge.records import State, TransitionError
from bridge.shard_votes import KEEP_SHA
from protocol.keys import PieceKey, UpdateKey
from protocol.lifecycle import Phase
from spec.shard_layout import assign_mergers

__all__ = ["piece_size", "update_size", "check_shard", "check_grant", "check_pieces", "check_votes",
           "mergers", "recorded_keys"]


def piece_size(st: State, stage: int, shard: int) -> Optional[int]:
    """Exact bytes of a pseudo-gradient piece of (stage, shard) (None: sizes unchecked, pure tests)."""
    spec = st.tun.sync
    return None if spec is None else spec.pieces[stage][shard]


def update_size(st: State, stage: int, shard: int) -> Optional[int]:
    """Exact bytes of a merged update of (stage, shard) (None: unchecked)."""
    spec = st.tun.sync
    return None if spec is None else spec.updates[stage][shard]


def check_shard(st: State, shard: int) -> None:
    """400 `bad_shard` unless 0 <= shard < sync_shards."""
    if not 0 <= shard < st.run.sync_shards:
        raise TransitionError("bad_shard", f"shard {shard} is not in 0..{st.run.sync_shards - 1}")


def _check_size(st: State, stage: int, shard: int, kind: str, size: int) -> None:
    want = piece_size(st, stage, shard) if kind == "pg" else update_size(st, stage, shard)
    if size < 1 or size > st.run.max_state_bytes:
        raise TransitionError("bad_size", f"shard {shard}: size {size} is not in 1..max_state_bytes")
    if want is not None and size != want:
        raise TransitionError("bad_size", f"shard {shard} of stage {stage}: a {'piece' if kind == 'pg' else 'merged update'} "
                              f"of this run is exactly {want} bytes, not {size}")


def mergers(st: State, round_: int, stage: int) -> list[list[str]]:
    """The merger table of the merging round's frozen stage (409 before it froze)."""
    if round_ != st.round or st.phase != Phase.MERGE:
        raise TransitionError("not_merging", f"round {round_} is not merging")
    if stage not in st.frozen:
        raise TransitionError("not_frozen", f"stage {stage} merge set is not frozen yet")
    stored = st.sync.get("ballots", {}).get(f"{round_}:{stage}")
    if stored is not None:
        return stored["mergers"]
    return assign_mergers(round_, stage, st.frozen[stage], st.run.sync_shards, st.run.sync_mergers)


def _cast(st: State, round_: int, stage: int, shard: int) -> dict[str, Any]:
    stored = st.sync.get("ballots", {}).get(f"{round_}:{stage}")
    return {} if stored is None else stored["votes"].get(str(shard), {})


def check_grant(st: State, caller: str, round_: int, kind: str, shard: int, sha: str, size: int) -> str:
    """The final key a PUT grant of one shard object leads to, or the refusal: pieces only from a
    replica that may report them (or re-sends the one it reported), merged updates only from a
    merger of that shard that has not voted another."""
    need_sharded(st)
    m = member(st, caller, round_)
    check_shard(st, shard)
    _check_size(st, m.stage, shard, kind, size)
    run = st.run.run_id
    if kind == "pg":
        rec = st.pseudograds.get(m.stage, {}).get(caller)
        if rec is None:
            check_report(st, caller, round_, sha)  # quarantined, frozen, no verified work
        elif rec.get("shards", [None] * (shard + 1))[shard] != sha:
            raise TransitionError("already_reported", "a different pseudo-gradient was reported")
        return PieceKey(run, round_, m.stage, caller, shard, sha).final
    if caller not in mergers(st, round_, m.stage)[shard]:
        raise TransitionError("not_a_merger", f"{caller} does not merge shard {shard} of stage {m.stage} "
                              f"in round {round_}: download the decided update instead")
    had = _cast(st, round_, m.stage, shard).get(caller)
    if had is not None and had["sha256"] != sha:
        raise TransitionError("already_voted", f"a different merged update of shard {shard} was reported")
    return UpdateKey(run, round_, m.stage, shard, caller, sha).final


def check_pieces(st: State, caller: str, round_: int, shas: Sequence[str], sizes: Sequence[int],
                 sha: str) -> tuple[list[str], bool]:
    """(final key per shard, whether it repeats the recorded report) for a pieces report of
    merge-set sha256 `sha`; refuses a wrong count, a wrong size or a replica that may not report."""
    need_sharded(st)
    m = member(st, caller, round_)
    if len(shas) != st.run.sync_shards or len(sizes) != len(shas):
        raise TransitionError("bad_shards", f"{len(shas)} shard sha256s and {len(sizes)} sizes; "
                              f"the run has sync_shards={st.run.sync_shards}")
    for s, n in enumerate(sizes):
        _check_size(st, m.stage, s, "pg", n)
    repeat = check_report(st, caller, round_, sha)
    return [PieceKey(st.run.run_id, round_, m.stage, caller, s, h).final for s, h in enumerate(shas)], repeat


def check_votes(st: State, caller: str, round_: int, votes: Sequence[tuple[int, str, int]]) -> list[str]:
    """The final key per (shard, sha256, size) vote (none is copied for "keep"); refuses a shard out
    of range or voted twice, a caller that does not merge it, a wrong size, or a changed vote."""
    need_sharded(st)
    m = member(st, caller, round_)
    table = mergers(st, round_, m.stage)
    seen: set[int] = set()
    finals = []
    for shard, sha, size in votes:
        check_shard(st, shard)
        if shard in seen:
            raise TransitionError("bad_shard", f"shard {shard} is voted twice in one request")
        seen.add(shard)
        if caller not in table[shard]:
            raise TransitionError("not_a_merger", f"{caller} does not merge shard {shard} of stage {m.stage} "
                                  f"in round {round_}: download the decided update instead")
        if sha == KEEP_SHA:
            if size != 0:
                raise TransitionError("bad_size", f"shard {shard}: a 'keep' vote (the empty object) has size 0")
        else:
            _check_size(st, m.stage, shard, "merged", size)
        had = _cast(st, round_, m.stage, shard).get(caller)
        if had is not None and had["sha256"] != sha:
            raise TransitionError("already_voted", f"a different merged update of shard {shard} was reported")
        finals.append(UpdateKey(st.run.run_id, round_, m.stage, shard, caller, sha).final)
    return finals


def recorded_keys(st: State, round_: int, stage: int) -> set[str]:
    """Every final key a kept ballot of (round, stage) holds a vote for (these must stay)."""
    stored = st.sync.get("ballots", {}).get(f"{round_}:{stage}") or {"votes": {}}
    return {v["key"] for cast in stored["votes"].values() for v in cast.values()}
