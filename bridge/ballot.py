"""The one ballot type: votes on a row of seats (a stage's shards, or its one full state), each seat
decided by its own voters under the same rules (pure: time is an argument, nothing is stored here).

- A seat is decided at once when every one of its voters voted the same sha256.
- Any dissent (two different votes, even 2 against 1) is a dispute that no count settles: only a
  validator's recomputation does (`arbitrate`: the agreeing voters' copy is used, or, when no
  voter agrees, the seat is kept). So voters that are a majority but not all (one owner's sybils)
  never decide against an honest voter's vote.
- At the vote deadline an undisputed seat whose voters agree and are a strict majority (the rest
  silent) is decided; a seat nobody voted on is kept; anything else becomes a dispute.
- A dispute nobody settles by its deadline keeps the seat.

"Kept" is `None` in `decided` (a shard keeps its values this round; a full state keeps the last
published one); a voter that found nothing to merge votes `KEEP_SHA`, the sha256 of the empty
object, which decides "keep" too. Every voter whose vote differs from the decision is flagged
(information for validators, who judge by recomputing). Deadlines are fixed when they are set
(a dispute opened at the vote deadline ends `arbitration` seconds after it, whoever notices), so
the same votes and the same clock give the same decisions whenever they are looked at.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from bridge.records import TransitionError

__all__ = ["KEEP_SHA", "Cast", "Decision", "Ballot", "open_ballot", "check_cast", "cast", "agrees",
           "advance", "arbitrate", "complete", "completed_at", "decisions", "disputed", "voted"]

KEEP_SHA = hashlib.sha256(b"").hexdigest()


@dataclass(frozen=True)
class Cast:
    """One vote: the sha256 of the object the voter computed, its final key and size."""

    sha256: str
    key: str
    size: int


@dataclass(frozen=True)
class Decision:
    """A seat's decided object: every agreeing voter's copy holds the same bytes."""

    sha256: str
    key: str
    size: int
    alt_keys: tuple[str, ...] = ()

    def row(self) -> dict[str, Any]:
        """The stored form."""
        return {"sha256": self.sha256, "key": self.key, "size": self.size, "alt_keys": list(self.alt_keys)}

    @classmethod
    def of(cls, d: Optional[dict[str, Any]]) -> Optional["Decision"]:
        """From the stored form (None: kept)."""
        return None if d is None else cls(d["sha256"], d["key"], d["size"], tuple(d.get("alt_keys", ())))


@dataclass
class Ballot:
    """Votes on `len(voters)` seats; `voters[seat]` may vote on `seat`."""

    voters: list[list[str]]
    deadline: float
    votes: list[dict[str, Cast]] = field(default_factory=list)
    decided: dict[int, Optional[Decision]] = field(default_factory=dict)
    decided_at: dict[int, float] = field(default_factory=dict)
    disputes: dict[int, float] = field(default_factory=dict)   # seat -> arbitration deadline
    flagged: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.votes:
            self.votes = [{} for _ in self.voters]

    def row(self) -> dict[str, Any]:
        """The stored form (JSON: seat numbers become strings)."""
        return {"voters": self.voters, "deadline": self.deadline,
                "votes": [{h: [c.sha256, c.key, c.size] for h, c in sorted(v.items())} for v in self.votes],
                "decided": {str(s): None if d is None else d.row() for s, d in sorted(self.decided.items())},
                "decided_at": {str(s): t for s, t in sorted(self.decided_at.items())},
                "disputes": {str(s): t for s, t in sorted(self.disputes.items())}, "flagged": list(self.flagged)}

    @classmethod
    def of(cls, d: Optional[dict[str, Any]]) -> Optional["Ballot"]:
        """From the stored form (None stays None)."""
        if d is None:
            return None
        return cls([list(v) for v in d["voters"]], d["deadline"],
                   [{h: Cast(*c) for h, c in v.items()} for v in d["votes"]],
                   {int(s): Decision.of(x) for s, x in d["decided"].items()},
                   {int(s): t for s, t in d["decided_at"].items()},
                   {int(s): t for s, t in d["disputes"].items()}, list(d["flagged"]))


def open_ballot(voters: Sequence[Sequence[str]], now: float, vote_timeout: float) -> Ballot:
    """A ballot whose votes are due `vote_timeout` seconds from `now`."""
    return Ballot([sorted(v) for v in voters], now + vote_timeout)


def check_cast(b: Ballot, hotkey: str, seat: int, sha256: str) -> None:
    """Refuse a vote that may not be cast (pure, for screening before any store access): 400 for a
    seat out of range, 409 for a voter not entitled to it or a changed vote."""
    if not 0 <= seat < len(b.voters):
        raise TransitionError("bad_shard", f"shard {seat} is not in 0..{len(b.voters) - 1}")
    if hotkey not in b.voters[seat]:
        raise TransitionError("not_a_merger", f"{hotkey} does not merge shard {seat}: download the "
                              "decided update instead")
    had = b.votes[seat].get(hotkey)
    if had is not None and had.sha256 != sha256:
        raise TransitionError("already_voted", f"a different merged object of shard {seat} was reported")


def cast(b: Ballot, hotkey: str, seat: int, vote: Cast, now: float, arbitration: float) -> Optional[bool]:
    """Record a vote; returns whether it agrees with the seat's decision (None: undecided yet)."""
    check_cast(b, hotkey, seat, vote.sha256)
    b.votes[seat][hotkey] = vote
    if seat not in b.decided:
        _settle(b, seat, now, arbitration)
    return agrees(b, seat, vote.sha256)


def agrees(b: Ballot, seat: int, sha256: str) -> Optional[bool]:
    """Whether `sha256` matches the seat's decision (None: undecided yet)."""
    if seat not in b.decided:
        return None
    d = b.decided[seat]
    return (d.sha256 if d else KEEP_SHA) == sha256


def _groups(b: Ballot, seat: int) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h, v in sorted(b.votes[seat].items()):
        out.setdefault(v.sha256, []).append(h)
    return out


def _settle(b: Ballot, seat: int, now: float, arbitration: float) -> None:
    groups = _groups(b, seat)
    if len(groups) > 1:  # dissent: only a validator's recomputation settles it, whatever the counts
        b.disputes.setdefault(seat, now + arbitration)
        return
    for voters in groups.values():
        if len(voters) == len(b.voters[seat]):
            _decide(b, seat, voters, now)


def _decide(b: Ballot, seat: int, voters: list[str], at: float) -> None:
    votes = b.votes[seat]
    sha = votes[voters[0]].sha256 if voters else None
    if sha is None or sha == KEEP_SHA:
        b.decided[seat] = None
    else:
        first = votes[voters[0]]
        b.decided[seat] = Decision(sha, first.key, first.size, tuple(votes[h].key for h in voters[1:]))
    b.decided_at[seat] = at
    for h, v in sorted(votes.items()):
        if v.sha256 != sha and h not in b.flagged:
            b.flagged.append(h)
    b.disputes.pop(seat, None)


def advance(b: Ballot, now: float, arbitration: float) -> bool:
    """Apply the deadlines that passed by `now` (each at its own time); returns whether anything
    changed."""
    changed = False
    for seat in range(len(b.voters)):
        if seat in b.decided:
            continue
        if seat in b.disputes:
            if now >= b.disputes[seat]:
                _decide(b, seat, [], b.disputes[seat])
                changed = True
            continue
        if now < b.deadline:
            continue
        groups = list(_groups(b, seat).values())
        if not groups:
            _decide(b, seat, [], b.deadline)
        elif len(groups) == 1 and 2 * len(groups[0]) > len(b.voters[seat]):
            _decide(b, seat, groups[0], b.deadline)
        else:
            b.disputes[seat] = b.deadline + arbitration
            if now >= b.disputes[seat]:
                _decide(b, seat, [], b.disputes[seat])
        changed = True
    return changed


def arbitrate(b: Ballot, seat: int, sha256: str, now: float) -> bool:
    """A validator's recomputed sha256 settles a disputed seat; returns whether a voter agreed."""
    if seat not in b.disputes or seat in b.decided:
        raise TransitionError("no_dispute", f"shard {seat} is not in dispute")
    voters = _groups(b, seat).get(sha256, [])
    _decide(b, seat, voters, now)
    return bool(voters)


def complete(b: Ballot) -> bool:
    """Whether every seat is decided."""
    return len(b.decided) == len(b.voters)


def completed_at(b: Ballot) -> float:
    """When the last seat was decided (only for a complete ballot)."""
    return max(b.decided_at.values(), default=b.deadline)


def decisions(b: Ballot) -> list[Optional[Decision]]:
    """Every seat's decision in order (None: kept); 409 until complete."""
    if not complete(b):
        raise TransitionError("not_decided", f"shards {[s for s in range(len(b.voters)) if s not in b.decided][:10]} "
                              "are not decided yet")
    return [b.decided[s] for s in range(len(b.voters))]


def disputed(b: Ballot) -> list[tuple[int, float]]:
    """(seat, arbitration deadline) of every open dispute."""
    return [(s, t) for s, t in sorted(b.disputes.items()) if s not in b.decided]


def voted(b: Ballot, seat: int) -> dict[str, str]:
    """{voter: sha256} on a seat."""
    return {h: v.sha256 for h, v in sorted(b.votes[seat].items())}
