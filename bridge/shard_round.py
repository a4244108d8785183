"""The sharded sync's round on the bridge (run config `sync_mode: sharded`), pure state.

A replica reports its pseudo-gradient as one sha256 per shard (the shard objects already copied
to their write-once final keys); it enters the stage's merge set exactly like a whole
pseudo-gradient (verified weight, quarantine, withholding grace: bridge.rounds), recorded under
the sha256 of its shard list. Once the set is frozen, a per-shard ballot (bridge.shard_votes, the
mergers from spec.shard_layout.assign_mergers) decides each shard's merged update. When every shard
is decided the stage's update is logged, and:
- in an ordinary round the stage is published at once (its checkpoint stays as it was);
- every `checkpoint_every`-th round the replicas then vote the full checkpoint through the
  whole-state vote (bridge.votes): a strict majority publishes it, anything else keeps the last.

Everything lives in `State.sync` (JSON, persisted with the meta row, so it survives a restart):
`ballots` {"round:stage": ballot}, `updates` {"stage": {"round": [decided ref or None]}}.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge import shard_checks, shard_votes, votes
from bridge.merge_rules import checkpoint_round, need_checkpoint_vote, need_sharded, pieces_sha, sharded
from bridge.records import State, TransitionError
from bridge.shard_votes import ShardBallot
from protocol.lifecycle import Phase

__all__ = ["keep_round", "sharded", "need_sharded", "need_checkpoint_vote", "ballot_dict", "stored_ballot", "pieces_sha", "ballot", "vote", "on_time", "arbitrate",
           "open_disputes", "updates_since", "checkpoint_round", "published_round", "keep_rounds"]

log = logging.getLogger(__name__)


def keep_rounds(st: State) -> int:
    """Rounds of ballots and update logs kept beyond the last checkpoint (audits look back)."""
    return st.run.audit_window_rounds + 2


def published_round(st: State, stage: int) -> int:
    """The round a stage's decided updates reach (its checkpoint's round before any; -1: none)."""
    done = [int(r) for r in st.sync.get("updates", {}).get(str(stage), {})]
    if done:
        return max(done) + 1
    ss = st.stage_states[stage]
    return ss.round if ss.sha256 else -1


def _bkey(round_: int, stage: int) -> str:
    return f"{round_}:{stage}"


def ballot_dict(b: ShardBallot) -> dict[str, Any]:
    """A ballot as JSON-able data (State.sync keeps these)."""
    return {"round": b.round, "stage": b.stage, "mergers": b.mergers, "vote_deadline": b.vote_deadline,
            "votes": {str(k): v for k, v in b.votes.items()},
            "decided": {str(k): v for k, v in b.decided.items()},
            "disputes": {str(k): v for k, v in b.disputes.items()}, "flagged": b.flagged}


def _from_dict(d: dict[str, Any]) -> ShardBallot:
    return ShardBallot(d["round"], d["stage"], d["mergers"], d["vote_deadline"],
                       {int(k): v for k, v in d["votes"].items()},
                       {int(k): v for k, v in d["decided"].items()},
                       {int(k): v for k, v in d["disputes"].items()}, list(d["flagged"]))


def stored_ballot(st: State, round_: int, stage: int) -> Optional[ShardBallot]:
    """The ballot of (round, stage) if one was opened and is still kept."""
    d = st.sync.get("ballots", {}).get(_bkey(round_, stage))
    return None if d is None else _from_dict(d)


def _save(st: State, b: ShardBallot) -> None:
    st.sync.setdefault("ballots", {})[_bkey(b.round, b.stage)] = ballot_dict(b)


def ballot(st: State, round_: int, stage: int, now: float) -> Optional[ShardBallot]:
    """The merging round's ballot of a stage, opened when its merge set froze (None: not frozen,
    or frozen empty)."""
    b = stored_ballot(st, round_, stage)
    if b is not None or round_ != st.round or st.phase != Phase.MERGE or not st.frozen.get(stage):
        return b
    b = shard_votes.new_ballot(round_, stage, st.frozen[stage], st.run.sync_shards,
                               st.run.sync_mergers, now, st.run.vote_timeout_seconds)
    _save(st, b)
    return b


def _merging_ballot(st: State, round_: int, stage: int, now: float) -> ShardBallot:
    if round_ != st.round or st.phase != Phase.MERGE:
        raise TransitionError("not_merging", f"round {round_} is not merging")
    b = ballot(st, round_, stage, now)
    if b is None:
        raise TransitionError("not_frozen", f"stage {stage} merge set is not frozen yet")
    return b


def vote(st: State, hotkey: str, round_: int, cast: list[tuple[int, str, str, int]],
         now: float) -> dict[int, Optional[bool]]:
    """Record a merger's (shard, sha256, final key, size) votes; {shard: agrees, None: undecided}.
    Every vote is checked first (bridge.shard_checks): a refusal records none of them."""
    finals = shard_checks.check_votes(st, hotkey, round_, [(s, sha, n) for s, sha, _, n in cast])
    if [k for _, _, k, _ in cast] != finals:
        raise TransitionError("bad_key", "the merged updates' keys are not their final keys")
    b = _merging_ballot(st, round_, st.miners[hotkey].stage, now)
    for shard, sha, key, size in cast:
        shard_votes.vote(b, hotkey, shard, sha, key, size, now, st.run.arbitration_timeout_seconds)
    _save(st, b)
    _after(st, b, now)
    return {s: shard_votes.agrees(b, s, sha) for s, sha, _, _ in cast}


def _after(st: State, b: ShardBallot, now: float) -> None:
    """A complete ballot logs the stage's update, then publishes it (or opens the checkpoint vote)."""
    if not shard_votes.complete(b) or st.published.get(b.stage) or st.round != b.round:
        return
    log_ = st.sync.setdefault("updates", {}).setdefault(str(b.stage), {})
    if str(b.round) in log_:
        return
    log_[str(b.round)] = shard_votes.update_refs(b)
    for h in b.flagged:
        if h in st.miners and h not in st.flagged:
            st.flagged.append(h)
            st.miners[h].disagreements += 1
    kept = sum(1 for d in log_[str(b.round)] if d is None)
    log.info("round %d stage %d: all %d shards decided (%d kept)", b.round, b.stage, len(b.mergers), kept)
    _prune(st)
    if checkpoint_round(st, b.round):
        st.vote_deadline[b.stage] = now + st.run.vote_timeout_seconds  # for the checkpoint vote
        return
    votes.publish(st, b.stage, [], now)  # the stage's checkpoint stays; its update is logged


def keep_round(st: State, stage: int) -> None:
    """A stage whose merge set froze empty keeps its state this round: its update is logged as all
    kept, so the views and catch-ups of later rounds find every round since the checkpoint (without
    it, one round nobody reported would answer `updates_pruned` to every later view: a halt)."""
    st.sync.setdefault("updates", {}).setdefault(str(stage), {}).setdefault(
        str(st.round), [None] * st.run.sync_shards)
    log.warning("round %d stage %d: no pseudo-gradient reported; every shard keeps its state", st.round, stage)


def _prune(st: State) -> None:
    horizon = st.round - keep_rounds(st)
    st.sync["ballots"] = {k: v for k, v in st.sync.get("ballots", {}).items()
                          if int(k.split(":")[0]) >= horizon}
    for s, log_ in st.sync.get("updates", {}).items():
        ckpt = st.stage_states[int(s)].round if int(s) < len(st.stage_states) else 0
        keep_from = min(horizon, ckpt)
        st.sync["updates"][s] = {r: v for r, v in log_.items() if int(r) >= keep_from}


def on_time(st: State, stage: int, now: float) -> None:
    """Deadlines of a frozen, unpublished stage: shard votes first, then the checkpoint vote."""
    b = ballot(st, st.round, stage, now)
    if b is None:
        return
    if shard_votes.complete(b):
        votes.on_time(st, stage, now)  # a checkpoint round waiting for the state votes
        return
    before, disputed = (len(b.decided), len(b.disputes)), set(b.disputes)
    shard_votes.on_time(b, now, st.run.arbitration_timeout_seconds)
    expired = sorted(s for s in disputed if s in b.decided)
    if expired:
        log.warning("round %d stage %d: no validator settled shard(s) %s in time; they keep their state "
                    "this round", b.round, stage, expired)
    if (len(b.decided), len(b.disputes)) != before:
        _save(st, b)
        _after(st, b, now)


def arbitrate(st: State, validator: str, round_: int, stage: int, shard: int, sha256: str,
              now: float) -> bool:
    """A validator's recomputation settles a disputed shard; returns whether a merger agreed."""
    need_sharded(st)
    b = _merging_ballot(st, round_, stage, now)
    agreed = shard_votes.arbitrate(b, shard, sha256)
    log.warning("round %d stage %d shard %d: validator %s recomputed %s; %s", round_, stage, shard,
                validator[:10], sha256[:12], "a merger agreed" if agreed else "no merger agreed: kept")
    _save(st, b)
    _after(st, b, now)
    return agreed


def open_disputes(st: State) -> list[dict[str, Any]]:
    """Disputed shards of the merging round."""
    if not sharded(st) or st.phase != Phase.MERGE:
        return []
    out = []
    for s in range(st.run.n_stages):
        b = stored_ballot(st, st.round, s)
        if b is not None:
            out.extend(shard_votes.open_disputes(b))
    return out


def updates_since(st: State, stage: int, first: int, end: int) -> list[list[Optional[dict[str, Any]]]]:
    """The logged updates of rounds first..end-1 (409 when one is no longer kept)."""
    log_ = st.sync.get("updates", {}).get(str(stage), {})
    missing = [r for r in range(first, end) if str(r) not in log_]
    if missing:
        raise TransitionError("updates_pruned", f"stage {stage}: the updates of rounds "
                              f"{missing[:5]} are not kept; load a later checkpoint")
    return [log_[str(r)] for r in range(first, end)]
