"""Votes on a stage's merged state, and who decides when they split.

Every replica of the frozen merge set computes the deterministic merge and reports the sha256 of
the state it got. The state is published at once when every member voted it; at the vote
deadline, when the voters agree and are a strict majority (the rest silent). Any dissent (two
different states, even 2-1), or a vote timeout without such a majority, is a dispute that no
tie-break and no group size settles, so colluding members that are a majority but not all
never publish against an honest member's vote:
a validator recomputes the merge from the frozen set and posts the sha256 it got
(`arbitrate`); the agreeing voters' state is published. If no voter agrees with it, or no
validator answers before the arbitration deadline, the stage keeps its previous state. So a
single liar never decides what is published, and the bridge never flags on a vote alone
(validators recompute and judge; `flagged` is information for the dashboard).
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from bridge.merge_rules import final_key, member, need_checkpoint_vote, sharded
from bridge.records import StageState, State, TransitionError
from bridge.round_start import start_round
from protocol.lifecycle import Phase

__all__ = ["report_merged", "add_late_vote", "recorded_size", "on_time", "arbitrate", "publish", "open_disputes"]

log = logging.getLogger(__name__)


def report_merged(st: State, hotkey: str, round_: int, sha256: str, key: str, size: int,
                  now: float) -> Optional[bool]:
    """Record a merged-state hash (state already copied to its final `key`); publish when the
    whole frozen set agrees. Returns whether this vote agrees with the published
    state (None until published)."""
    m = member(st, hotkey, round_)
    if sharded(st):
        need_checkpoint_vote(st, m.stage, round_)
    if key != final_key(st, hotkey, round_, "state", sha256):
        raise TransitionError("bad_key", f"key {key[:200]!r} is not this state's key")
    if m.stage not in st.frozen:
        raise TransitionError("not_frozen", f"stage {m.stage} merge set is not frozen yet")
    if hotkey not in st.frozen[m.stage]:
        raise TransitionError("not_in_merge_set", f"{hotkey} is not in stage {m.stage}'s "
                              "merge set: load the published state when it comes")
    cast = st.votes.setdefault(m.stage, {})
    if hotkey in cast and cast[hotkey]["sha256"] != sha256:
        raise TransitionError("already_voted", "a different merged state was reported")
    cast[hotkey] = {"sha256": sha256, "key": key, "size": size}
    if st.published.get(m.stage):
        return sha256 == st.stage_states[m.stage].sha256
    _settle(st, m.stage, now)
    if st.published.get(m.stage) or m.stage not in st.frozen:
        return sha256 == st.stage_states[m.stage].sha256
    return None


def add_late_vote(archive: dict[str, Any], hotkey: str, stage: int, sha256: str) -> bool:
    """Add a merge-set member's vote that arrived after its round was archived (first only)."""
    cast = archive.setdefault("votes", [])
    members = {(p["hotkey"], p.get("stage")) for p in archive.get("pseudograds", [])}
    if (hotkey, stage) not in members or any(v["hotkey"] == hotkey for v in cast):
        return False
    cast.append({"hotkey": hotkey, "stage": stage, "sha256": sha256})
    return True


def recorded_size(st: State, hotkey: str, sha256: str) -> Optional[int]:
    """Size of `hotkey`'s recorded vote for `sha256` in the merging round (None: not recorded)."""
    m = st.miners.get(hotkey)
    if m is None or st.phase != Phase.MERGE:
        return None
    v = st.votes.get(m.stage, {}).get(hotkey)
    return v["size"] if v is not None and v["sha256"] == sha256 else None


def _groups(st: State, stage: int) -> dict[str, list[str]]:
    members = set(st.frozen.get(stage, ()))
    out: dict[str, list[str]] = {}
    for h, v in sorted(st.votes.get(stage, {}).items()):
        if h in members:
            out.setdefault(v["sha256"], []).append(h)
    return out


def _settle(st: State, stage: int, now: float) -> None:
    """Publish when every member voted the same state; open a dispute at the first dissent."""
    members = st.frozen[stage]
    groups = _groups(st, stage)
    if len(groups) > 1:
        if stage not in st.disputes:
            _open_dispute(st, stage, now, "merged states differ")
        return
    for voters in groups.values():
        if len(voters) == len(members):
            publish(st, stage, voters, now)


def _open_dispute(st: State, stage: int, now: float, why: str) -> None:
    st.disputes[stage] = now + st.run.arbitration_timeout_seconds
    st.events.append(("dispute", (st.round, stage)))
    log.warning("round %d stage %d: %s (%s); waiting up to %.0fs for a validator's "
                "recomputation", st.round, stage, why,
                ", ".join(f"{sha[:8]}x{len(v)}" for sha, v in _groups(st, stage).items()) or "no votes",
                st.run.arbitration_timeout_seconds)


def on_time(st: State, stage: int, now: float) -> None:
    """Deadlines of a frozen, unpublished stage: vote timeout -> dispute (or keep the previous
    state when nobody voted); arbitration timeout -> keep the previous state."""
    if stage in st.disputes:
        if now >= st.disputes[stage]:
            log.warning("round %d stage %d: no validator settled the dispute in time; the stage "
                        "keeps its previous state", st.round, stage)
            publish(st, stage, [], now)
        return
    if now < st.vote_deadline.get(stage, float("inf")):
        return
    groups = list(_groups(st, stage).values())
    if not groups:
        log.warning("round %d stage %d: no merged state reported by the deadline; the stage "
                    "keeps its previous state", st.round, stage)
        publish(st, stage, [], now)
        return
    if len(groups) == 1 and 2 * len(groups[0]) > len(st.frozen[stage]):
        publish(st, stage, groups[0], now)  # the rest stayed silent; nobody dissented
        return
    _open_dispute(st, stage, now, "vote timeout without a strict majority")


def open_disputes(st: State) -> list[dict[str, Any]]:
    """Disputed stages of the merging round, with their frozen sets and votes."""
    if st.phase != Phase.MERGE:
        return []
    out = []
    for stage in sorted(st.disputes):
        if st.published.get(stage):
            continue
        out.append({"round": st.round, "stage": stage, "deadline": st.disputes[stage],
                    "start": StageState(**st.round_states[stage]) if st.round_states else StageState(),
                    "items": [dict(hotkey=h, stage=stage, **st.pseudograds[stage][h])
                              for h in st.frozen[stage]],
                    "votes": {h: v["sha256"] for h, v in sorted(st.votes.get(stage, {}).items())}})
    return out


def arbitrate(st: State, validator: str, round_: int, stage: int, sha256: str,
              now: float) -> bool:
    """A validator's recomputed sha settles a dispute: the agreeing voters' state is published,
    or, when no voter agrees, the previous state is kept. Returns whether a vote agreed."""
    if round_ != st.round or st.phase != Phase.MERGE or stage not in st.disputes \
            or st.published.get(stage):
        raise TransitionError("no_dispute", f"round {round_} stage {stage} is not in dispute")
    voters = _groups(st, stage).get(sha256, [])
    log.warning("round %d stage %d: validator %s recomputed %s; %s", round_, stage,
                validator[:10], sha256[:12],
                f"publishing the state of {len(voters)} agreeing voter(s)" if voters
                else "no voter agrees: the stage keeps its previous state")
    publish(st, stage, voters, now)
    return bool(voters)


def publish(st: State, stage: int, voters: list[str], now: float) -> None:
    """Publish the agreeing voters' state (their copies are interchangeable), or keep the
    previous one when `voters` is empty; flag every other voter; maybe start the next round."""
    cast = st.votes.get(stage, {})
    if voters:
        first = cast[voters[0]]
        st.stage_states[stage] = StageState(
            round=st.round + 1, key=first["key"], sha256=first["sha256"], size=first["size"],
            alt_keys=[cast[h]["key"] for h in voters[1:]])
    agreed = st.stage_states[stage].sha256 if voters else None
    for h, v in sorted(cast.items()):
        if v["sha256"] != agreed and h not in st.flagged:
            st.flagged.append(h)
            if h in st.miners:
                st.miners[h].disagreements += 1
    st.published[stage] = True
    st.disputes.pop(stage, None)
    st.events.append(("published", (st.round, stage)))
    log.info("round %d stage %d: state for round %d published (%s)", st.round, stage,
             st.round + 1, (st.stage_states[stage].sha256 or "init")[:12])
    if all(st.published.get(s) for s in range(st.run.n_stages)):
        start_round(st, st.round + 1, now)
