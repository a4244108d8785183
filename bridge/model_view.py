"""Which weights make up the model a round published (pure: the state record and a round archive
in, plain data out; `bridge.model_api` signs URLs and serves it as `GET /v1/model`).

Round R's model is what round R + 1 starts from: `round_states` of round R + 1 (its archive once
it is gone, or the live `stage_states` when R is the run's last round). A round is refused, with
the stage and the reason, when a stage did not publish its own merge of it: under the whole-state
sync a stage whose merge was disputed (or had no votes) keeps an older state, and a model mixing
rounds is not what any replica voted for; under the sharded sync a stage needs the decided update
of every round since its checkpoint, and the log of old rounds is pruned.
"""
from __future__ import annotations

from typing import Any, Optional

from bridge import shard_round
from bridge.records import StageState, State, TransitionError
from protocol.lifecycle import Phase

__all__ = ["latest_round", "needs_archive", "model_data"]


def latest_round(st: State) -> Optional[int]:
    """The latest round whose model is published (None: round 0 is still running)."""
    r = st.round if st.phase == Phase.DONE else st.round - 1
    return r if r >= 0 else None


def needs_archive(st: State, round_: int) -> Optional[int]:
    """The round whose archive `model_data` needs for `round_` (None: the live state suffices)."""
    return round_ + 1 if round_ + 1 < st.round else None


def _start(st: State, round_: int, archive_next: Optional[dict[str, Any]]) -> tuple[list[dict], Optional[int]]:
    """(stage states round_ + 1 starts from, samples completed through round_)."""
    if st.phase == Phase.DONE and round_ == st.round:
        return [dict(vars(s)) for s in st.stage_states], st.completed_total
    if round_ + 1 == st.round:
        return list(st.round_states), st.completed_total - st.r_completed
    if archive_next is None or len(archive_next.get("states", [])) != st.run.n_stages:
        raise TransitionError("not_kept", f"the states of round {round_} are not kept")
    return list(archive_next["states"]), archive_next.get("completed_before")


def _whole(stage: int, ss: StageState, round_: int) -> dict[str, Any]:
    if ss.sha256 is None or ss.key is None:
        raise TransitionError("kept_state", f"stage {stage} has published no merged state by round "
                              f"{round_}: it is still the init; export a later round")
    if ss.round != round_ + 1:
        raise TransitionError("kept_state", f"stage {stage} published no state of its own in round {round_} "
                              f"(a disputed or empty merge kept its round-{ss.round - 1} state); "
                              "export another round")
    return {"stage": stage, "state": ss, "checkpoint_round": ss.round, "updates": []}


def _sharded(st: State, stage: int, ss: StageState, round_: int) -> dict[str, Any]:
    first = ss.round if ss.key else 0
    logged = st.sync.get("updates", {}).get(str(stage), {})
    missing = [r for r in range(first, round_ + 1) if str(r) not in logged]
    if missing:
        raise TransitionError("updates_pruned", f"stage {stage}: no decided update of round(s) "
                              f"{missing[:5]} is kept (the stage did not merge then, or the log was "
                              "pruned); export another round")
    return {"stage": stage, "state": ss if ss.key else None, "checkpoint_round": first,
            "updates": shard_round.updates_since(st, stage, first, round_ + 1)}


def model_data(st: State, round_: Optional[int], archive_next: Optional[dict[str, Any]]
               ) -> dict[str, Any]:
    """{round, latest, samples, stages: [{stage, state (StageState or None), checkpoint_round,
    updates}]} of round `round_` (None: the latest); `archive_next` is round_ + 1's archive when
    `needs_archive` says so."""
    latest = latest_round(st)
    if latest is None:
        raise TransitionError("not_published", f"no model is published yet: round 0 is still "
                              f"{st.phase} (the first model comes when its merge is published)")
    r = latest if round_ is None else round_
    if r > latest:
        raise TransitionError("not_published", f"round {r} has no published model yet; the latest is "
                              f"round {latest}")
    states, samples = _start(st, r, archive_next)
    stages = []
    for s, d in enumerate(states):
        ss = StageState(**d)
        stages.append(_sharded(st, s, ss, r) if st.run.sharded else _whole(s, ss, r))
    return {"round": r, "latest": latest, "samples": samples, "stages": stages}
