"""Votes on a sharded round's merged updates: one ballot per stage, decided shard by shard.

The same rules as bridge/votes.py, applied to each shard and its assigned mergers
(resbm.shards.assign_mergers over the frozen merge set): the shard's merged update is decided at
once when every merger voted it; any dissent (two different votes), or the vote deadline without
a silent-but-undisputed strict majority, is a dispute that only a validator's recomputation
settles (`arbitrate`: the agreeing voters' copy is used, or, when none agrees, the shard keeps its
state this round). So mergers that are a majority but not all (one owner's sybils, 2 of 3) never
decide against an honest merger's vote: its dissent hands the shard to the validator. A merger that
found nothing usable votes the sha256 of the empty object, which decides "keep". Every voter that
differs from the decision is flagged (information for the validators, who judge by recomputing).
The stage's round is complete once every shard is decided; its update is the decided objects.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from bridge.records import TransitionError
from resbm.shards import assign_mergers

__all__ = ["KEEP_SHA", "ShardBallot", "new_ballot", "vote", "agrees", "on_time", "arbitrate", "complete",
           "update_refs", "open_disputes"]

KEEP_SHA = hashlib.sha256(b"").hexdigest()


@dataclass
class ShardBallot:
    """One stage's per-shard votes in one round."""

    round: int
    stage: int
    mergers: list[list[str]]
    vote_deadline: float
    votes: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    decided: dict[int, Optional[dict[str, Any]]] = field(default_factory=dict)
    disputes: dict[int, float] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)


def new_ballot(round_: int, stage: int, frozen: Sequence[str], n_shards: int, mergers: int,
               now: float, vote_timeout: float) -> ShardBallot:
    """The ballot of a frozen merge set: who merges each shard, and the vote deadline."""
    return ShardBallot(round_, stage, assign_mergers(round_, stage, frozen, n_shards, mergers),
                       now + vote_timeout)


def _groups(b: ShardBallot, shard: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h, v in sorted(b.votes.get(shard, {}).items()):
        out.setdefault(v["sha256"], []).append(h)
    return out


def vote(b: ShardBallot, hotkey: str, shard: int, sha256: str, key: str, size: int, now: float,
         arbitration_timeout: float) -> Optional[bool]:
    """Record a merger's vote on a shard; returns whether it agrees with the decision (None:
    undecided yet). 400 for a shard out of range, 409 for a non-merger or a changed vote."""
    if not 0 <= shard < len(b.mergers):
        raise TransitionError("bad_shard", f"shard {shard} is not in 0..{len(b.mergers) - 1}")
    if hotkey not in b.mergers[shard]:
        raise TransitionError("not_a_merger", f"{hotkey} does not merge shard {shard} of stage "
                              f"{b.stage} in round {b.round}: download the decided update instead")
    cast = b.votes.setdefault(shard, {})
    if hotkey in cast and cast[hotkey]["sha256"] != sha256:
        raise TransitionError("already_voted", "a different merged shard was reported")
    cast[hotkey] = {"sha256": sha256, "key": key, "size": size}
    if shard not in b.decided:
        _settle(b, shard, now, arbitration_timeout)
    return agrees(b, shard, sha256)


def agrees(b: ShardBallot, shard: int, sha256: str) -> Optional[bool]:
    """Whether `sha256` matches the shard's decision (None: undecided yet)."""
    if shard not in b.decided:
        return None
    d = b.decided[shard]
    return (d["sha256"] if d else KEEP_SHA) == sha256


def _settle(b: ShardBallot, shard: int, now: float, arbitration_timeout: float) -> None:
    members = b.mergers[shard]
    groups = _groups(b, shard)
    if len(groups) > 1:  # dissent: only a validator's recomputation settles it, whatever the counts
        b.disputes.setdefault(shard, now + arbitration_timeout)
        return
    for voters in groups.values():
        if len(voters) == len(members):  # every merger of the shard agrees
            _decide(b, shard, voters)


def _decide(b: ShardBallot, shard: int, voters: list[str]) -> None:
    cast = b.votes.get(shard, {})
    sha = cast[voters[0]]["sha256"] if voters else None
    if sha is None or sha == KEEP_SHA:
        b.decided[shard] = None
    else:
        b.decided[shard] = {"sha256": sha, "key": cast[voters[0]]["key"], "size": cast[voters[0]]["size"],
                            "alt_keys": [cast[h]["key"] for h in voters[1:]]}
    agreed = sha if voters else None
    for h, v in sorted(cast.items()):
        if v["sha256"] != agreed and h not in b.flagged:
            b.flagged.append(h)
    b.disputes.pop(shard, None)


def on_time(b: ShardBallot, now: float, arbitration_timeout: float) -> None:
    """Deadlines. At the vote deadline: keep when nobody voted; the voters' update when they agree
    and are a strict majority of the shard's mergers (the rest silent, none dissenting); else a
    dispute. At the arbitration deadline: keep."""
    for shard in range(len(b.mergers)):
        if shard in b.decided:
            continue
        if shard in b.disputes:
            if now >= b.disputes[shard]:
                _decide(b, shard, [])
            continue
        if now >= b.vote_deadline:
            groups = list(_groups(b, shard).values())
            if not groups:
                _decide(b, shard, [])
            elif len(groups) == 1 and 2 * len(groups[0]) > len(b.mergers[shard]):
                _decide(b, shard, groups[0])
            else:
                b.disputes[shard] = now + arbitration_timeout


def arbitrate(b: ShardBallot, shard: int, sha256: str) -> bool:
    """A validator's recomputed sha settles a disputed shard; returns whether a voter agreed."""
    if shard not in b.disputes or shard in b.decided:
        raise TransitionError("no_dispute", f"shard {shard} of stage {b.stage} is not in dispute")
    voters = _groups(b, shard).get(sha256, [])
    _decide(b, shard, voters)
    return bool(voters)


def complete(b: ShardBallot) -> bool:
    """Whether every shard of the stage is decided."""
    return len(b.decided) == len(b.mergers)


def update_refs(b: ShardBallot) -> list[Optional[dict[str, Any]]]:
    """The decided update per shard ({sha256, key, size, alt_keys}, or None to keep it)."""
    if not complete(b):
        raise TransitionError("not_decided", f"stage {b.stage}: shards "
                              f"{[s for s in range(len(b.mergers)) if s not in b.decided][:10]} undecided")
    return [b.decided[s] for s in range(len(b.mergers))]


def open_disputes(b: ShardBallot) -> list[dict[str, Any]]:
    """Disputed shards with their mergers' votes (for the validators)."""
    return [{"round": b.round, "stage": b.stage, "shard": s, "deadline": d, "mergers": b.mergers[s],
             "votes": {h: v["sha256"] for h, v in sorted(b.votes.get(s, {}).items())}}
            for s, d in sorted(b.disputes.items()) if s not in b.decided]
