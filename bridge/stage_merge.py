"""One stage's merge in one round: a typed record with a phase, driven by pure transitions.

```
 COLLECTING --freeze--> VOTING --every shard decided--> DONE
   (reports)    (set)     (shard ballot)      \--checkpoint round--> CHECKPOINT --state decided--> DONE
                                                                    (state ballot)
```

- COLLECTING: the round closed; each worker reports its pseudo-gradient as pieces (a `Report`:
  one sha256 and size per shard, the bridge's count of its verified samples). The set freezes
  when nobody is awaited, at the report grace (half the workers reported, the rest get
  `vote_timeout` more), or at the merge timeout. A set that freezes empty is DONE at once (every
  shard kept).
- VOTING: the `shards` ballot (bridge.ballot): each shard's assigned mergers (protocol.sync_plan.
  assign_mergers over the frozen set) vote its merged update.
- CHECKPOINT (every K-th round): the `state` ballot: every member of the set votes the full state.
- DONE: the round's update is `shards`' decisions; the published state, when the `state`
  ballot decided one.

The whole-state merge is this with one shard merged by every member and a checkpoint every
round. Transitions take time as an argument and touch only the record; what the rest of the
state must learn (flags, the published state) is bridge.merging's business. Every deadline is
the time its condition became true, so looking later (a read) reaches the same record as
looking at once (a write).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Collection, Optional

from bridge import ballot
from bridge.ballot import Ballot, Cast
from bridge.records import TransitionError
from bridge.tracking import Tracked, record
from protocol.run_config import RunConfig
from protocol.sync_plan import assign_mergers, sync_plan

__all__ = ["MergePhase", "Report", "Rules", "StageMerge", "merge_id", "pieces_sha", "open_merge",
           "repeat_of", "need_collecting", "add_report", "advance", "vote_shard", "vote_state", "arbitrate_shard",
           "arbitrate_state"]


class MergePhase(StrEnum):
    """Where a stage's merge is (a member is its stored string)."""

    COLLECTING = "collecting"
    VOTING = "voting"
    CHECKPOINT = "checkpoint"
    DONE = "done"


def pieces_sha(shas: Collection[str]) -> str:
    """A report's identity in the merge set: sha256 of its shard sha256s, one a line."""
    return hashlib.sha256("\n".join(shas).encode()).hexdigest()


@dataclass(frozen=True)
class Report:
    """A replica's pseudo-gradient in the merge set: per shard sha256 and size, and its weight
    (backwards the bridge verified since its last registration, in registration `epoch`)."""

    samples: int
    epoch: int
    shas: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def sha256(self) -> str:
        """The report's identity (pieces_sha)."""
        return pieces_sha(self.shas)

    def row(self) -> list[Any]:
        """The stored form."""
        return [self.samples, self.epoch, list(self.shas), list(self.sizes)]

    @classmethod
    def of(cls, row: list[Any]) -> "Report":
        """From the stored form."""
        return cls(row[0], row[1], tuple(row[2]), tuple(row[3]))


@dataclass(frozen=True)
class Rules:
    """The run's merge knobs a record's transitions need."""

    shards: int
    mergers: int
    merge_timeout: float
    vote_timeout: float
    arbitration: float

    @classmethod
    def of(cls, run: RunConfig) -> "Rules":
        """From the run config (its sync plan for shards and mergers)."""
        plan = sync_plan(run)
        return cls(plan.shards, plan.mergers, run.merge_timeout_seconds, run.vote_timeout_seconds,
                   run.arbitration_timeout_seconds)


def merge_id(round_: int, stage: int) -> int:
    """The record's id: one per (round, stage) (stages are fewer than 64)."""
    return round_ * 64 + stage


@record
class StageMerge(Tracked):
    """One stage's merge in one round (see the module docstring)."""

    KIND = "merge"

    round: int
    stage: int
    closed_at: float                     # the round closed: the merge timeout counts from here
    workers: tuple[str, ...]             # replicas that worked this round (whose report is awaited)
    checkpoint: bool                     # this round ends with a full-state vote
    phase: MergePhase = MergePhase.COLLECTING
    reports: dict[str, Report] = field(default_factory=dict)
    grace_until: Optional[float] = None  # set when half the workers reported
    frozen: tuple[str, ...] = ()         # the merge set, in hotkey order (once frozen)
    frozen_at: Optional[float] = None
    shards: Optional[Ballot] = None      # per-shard merged updates (once frozen)
    state: Optional[Ballot] = None       # the full state's vote (checkpoint rounds)

    @property
    def ident(self) -> int:
        """Primary key: merge_id(round, stage)."""
        return merge_id(self.round, self.stage)

    def row(self) -> dict[str, Any]:
        """The stored form."""
        d = super().row()
        d["phase"] = self.phase.value
        d["workers"], d["frozen"] = list(self.workers), list(self.frozen)
        d["reports"] = {h: r.row() for h, r in sorted(self.reports.items())}
        d["shards"] = None if self.shards is None else self.shards.row()
        d["state"] = None if self.state is None else self.state.row()
        return d

    @classmethod
    def from_row(cls, d: dict[str, Any]) -> "StageMerge":
        """From a stored row."""
        return cls(**{**d, "phase": MergePhase(d["phase"]), "workers": tuple(d["workers"]),
                      "frozen": tuple(d["frozen"]),
                      "reports": {h: Report.of(r) for h, r in d["reports"].items()},
                      "shards": Ballot.of(d["shards"]), "state": Ballot.of(d["state"])})

    @property
    def update(self) -> Optional[list[Optional[ballot.Decision]]]:
        """The round's decided update per shard (None: kept), once every shard is decided."""
        if self.phase == MergePhase.DONE and self.shards is None:
            return None  # froze empty: nothing merged (every shard kept)
        return ballot.decisions(self.shards) if self.shards is not None and ballot.complete(self.shards) else None

    @property
    def done(self) -> bool:
        """The stage's round is over."""
        return self.phase == MergePhase.DONE

    def items(self) -> list[tuple[str, Report]]:
        """The frozen merge set's reports, in hotkey order."""
        return [(h, self.reports[h]) for h in self.frozen]


def open_merge(round_: int, stage: int, workers: Collection[str], now: float, checkpoint: bool) -> StageMerge:
    """A stage's merge as its round closes."""
    return StageMerge(round=round_, stage=stage, closed_at=now, workers=tuple(sorted(workers)),
                      checkpoint=checkpoint)


def repeat_of(m: StageMerge, hotkey: str, report: Report) -> bool:
    """Whether `report` repeats the one `hotkey` entered (409 `already_reported` for another one)."""
    have = m.reports.get(hotkey)
    if have is None:
        return False
    if have.sha256 != report.sha256:
        raise TransitionError("already_reported", "a different pseudo-gradient was reported")
    return True


def need_collecting(m: StageMerge) -> None:
    """409 `frozen` once the merge set is frozen."""
    if m.phase != MergePhase.COLLECTING:
        raise TransitionError("frozen", f"stage {m.stage} merge set is already frozen")


def add_report(m: StageMerge, hotkey: str, report: Report, waiting: Collection[str], now: float,
               rules: Rules) -> None:
    """Enter a report (the same one again: no-op), then freeze if that was the last one awaited.
    The caller checks the replica's entitlement (bridge.merging.check_report)."""
    if repeat_of(m, hotkey, report):
        return
    advance(m, now, waiting, rules)
    need_collecting(m)
    m.reports = {**m.reports, hotkey: report}
    advance(m, now, [h for h in waiting if h != hotkey], rules)


def _freeze_time(m: StageMerge, now: float, waiting: Collection[str], rules: Rules) -> Optional[float]:
    """When the set froze (None: not yet): at once with nobody awaited, else at the first deadline."""
    if not waiting:
        return now
    due = min(m.closed_at + rules.merge_timeout, m.grace_until if m.grace_until is not None else float("inf"))
    return due if now >= due else None


def advance(m: StageMerge, now: float, waiting: Collection[str], rules: Rules) -> bool:
    """Everything that happens with time and with who is awaited (`waiting`: workers that may still
    report); returns whether the record changed. Pure: a read may run it on a copy."""
    phase, changed = m.phase, False
    if m.phase == MergePhase.COLLECTING:
        if waiting and m.grace_until is None and 2 * len(m.reports) >= len(m.workers):
            m.grace_until = now + min(rules.vote_timeout, rules.merge_timeout)
            changed = True
        at = _freeze_time(m, now, waiting, rules)
        if at is not None:
            _freeze(m, at, rules)
    if m.phase == MergePhase.VOTING:
        changed |= ballot.advance(m.shards, now, rules.arbitration)
        if ballot.complete(m.shards):
            if m.checkpoint:
                m.phase = MergePhase.CHECKPOINT
                m.state = ballot.open_ballot([m.frozen], ballot.completed_at(m.shards), rules.vote_timeout)
            else:
                m.phase = MergePhase.DONE
    if m.phase == MergePhase.CHECKPOINT:
        changed |= ballot.advance(m.state, now, rules.arbitration)
        if ballot.complete(m.state):
            m.phase = MergePhase.DONE
    changed |= m.phase != phase
    if changed:
        m.changed()  # the ballots changed in place
    return changed


def _freeze(m: StageMerge, at: float, rules: Rules) -> None:
    m.frozen, m.frozen_at = tuple(sorted(m.reports)), at
    if not m.frozen:
        m.phase = MergePhase.DONE  # no work: every shard (and the published state) kept
        return
    table = assign_mergers(m.round, m.stage, m.frozen, rules.shards, rules.mergers)
    m.shards = ballot.open_ballot(table, at, rules.vote_timeout)
    m.phase = MergePhase.VOTING


def _need(m: StageMerge, phase: MergePhase) -> Ballot:
    if m.phase == MergePhase.COLLECTING:
        raise TransitionError("not_frozen", f"stage {m.stage} merge set is not frozen yet")
    if phase == MergePhase.CHECKPOINT and not m.checkpoint:
        raise TransitionError("not_checkpoint", f"round {m.round} ends with no checkpoint: its update is "
                              "voted shard by shard")
    if phase == MergePhase.CHECKPOINT and m.phase == MergePhase.VOTING:
        raise TransitionError("not_decided", f"stage {m.stage}'s shards of round {m.round} are not all "
                              "decided yet: vote the checkpoint once they are")
    b = m.shards if phase == MergePhase.VOTING else m.state
    if b is None:
        raise TransitionError("not_in_merge_set", f"stage {m.stage}'s merge set of round {m.round} is empty")
    return b


def vote_shard(m: StageMerge, hotkey: str, shard: int, vote: Cast, now: float, waiting: Collection[str],
               rules: Rules) -> Optional[bool]:
    """A merger's vote on one shard's merged update; whether it agrees with the decision (None: undecided)."""
    advance(m, now, waiting, rules)
    return _cast(m, _need(m, MergePhase.VOTING), hotkey, shard, vote, now, waiting, rules)


def _cast(m: StageMerge, b: Ballot, hotkey: str, seat: int, vote: Cast, now: float, waiting: Collection[str],
          rules: Rules) -> Optional[bool]:
    ballot.check_cast(b, hotkey, seat, vote.sha256)
    if b.votes[seat].get(hotkey) == vote:  # a repeat (polling for the decision): nothing changes
        return ballot.agrees(b, seat, vote.sha256)
    agreed = ballot.cast(b, hotkey, seat, vote, now, rules.arbitration)
    m.changed()
    advance(m, now, waiting, rules)
    return agreed


def vote_state(m: StageMerge, hotkey: str, vote: Cast, now: float, waiting: Collection[str],
               rules: Rules) -> Optional[bool]:
    """A member's vote on the full state of a checkpoint round (None: undecided yet)."""
    advance(m, now, waiting, rules)
    b = _need(m, MergePhase.CHECKPOINT)
    if hotkey not in b.voters[0]:
        raise TransitionError("not_in_merge_set", f"{hotkey} is not in stage {m.stage}'s merge set: "
                              "load the published state when it comes")
    return _cast(m, b, hotkey, 0, vote, now, waiting, rules)


def arbitrate_shard(m: StageMerge, shard: int, sha256: str, now: float, waiting: Collection[str],
                    rules: Rules) -> bool:
    """A validator's recomputation settles a disputed shard; whether a merger agreed."""
    advance(m, now, waiting, rules)
    if m.phase != MergePhase.VOTING:
        raise TransitionError("no_dispute", f"round {m.round} stage {m.stage} has no shard in dispute")
    agreed = ballot.arbitrate(m.shards, shard, sha256, now)
    m.changed()
    advance(m, now, waiting, rules)
    return agreed


def arbitrate_state(m: StageMerge, sha256: str, now: float, waiting: Collection[str], rules: Rules) -> bool:
    """A validator's recomputation settles a disputed checkpoint; whether a voter agreed."""
    advance(m, now, waiting, rules)
    if m.phase != MergePhase.CHECKPOINT:
        raise TransitionError("no_dispute", f"round {m.round} stage {m.stage} is not in dispute")
    agreed = ballot.arbitrate(m.state, 0, sha256, now)
    m.changed()
    advance(m, now, waiting, rules)
    return agreed
