"""Which weights make up a round's published model (bridge.model_view, pure state machine): the
latest round, the decided state (voters unanimous, or a dispute settled by a validator), and refusals for a round nothing or a dispute decided."""
from __future__ import annotations

import random

import pytest

from bridge import model_view, state, votes
from bridge.records import StageState, TransitionError
from protocol.errors import http_status
from protocol.lifecycle import Phase
from tests.harness.bridge_state import drive, make, merge_round

GOOD, BAD, OTHER = "5" * 64, "0" * 64, "7" * 64
WHOLE_STATE = "state"  # these rounds publish through the whole-state vote (the sharded one: the last test)


def _trained_round(st, rng, now):
    return drive(st, sorted(st.miners), rng, now)


def test_nothing_is_published_while_round_zero_trains():
    st, rng = make(1, samples_per_round=8), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    with pytest.raises(TransitionError) as e:
        model_view.model_data(st, None, None)
    assert e.value.code == "not_published" and "round 0" in e.value.message
    assert http_status(e.value.code) == 409
    assert model_view.latest_round(st) is None


def test_the_decided_state_is_the_model_and_a_kept_round_is_refused_naming_the_stage():
    st, rng = make(1, samples_per_round=12, total_rounds=2, sync_mode=WHOLE_STATE), random.Random(0)
    for hk in "abc":
        state.register(st, hk, 0.0, rng)
    now = _trained_round(st, rng, 1.0)
    merge_round(st, now, {"a": GOOD, "c": BAD, "b": GOOD})  # a dissent: disputed until recomputed
    assert st.round == 0
    votes.arbitrate(st, "v", 0, 0, GOOD, now)  # the validator's recomputation agrees with a and b
    assert st.round == 1 and model_view.latest_round(st) == 0
    d = model_view.model_data(st, None, None)
    assert d["round"] == d["latest"] == 0 and d["samples"] == 12
    (stage,) = d["stages"]
    assert stage["state"].sha256 == GOOD and stage["state"].round == 1 and stage["updates"] == []
    assert stage["state"].key.endswith(f"/state/a-{GOOD}")  # a voter's copy, never the liar's

    now = _trained_round(st, rng, now + 1)
    merge_round(st, now, {"a": GOOD, "b": BAD, "c": OTHER})  # no agreement: a dispute
    votes.arbitrate(st, "v", 1, 0, "9" * 64, now)  # the validator agrees with nobody: kept
    assert st.phase == Phase.DONE and model_view.latest_round(st) == 1
    with pytest.raises(TransitionError) as e:
        model_view.model_data(st, None, None)
    assert e.value.code == "kept_state" and "stage 0" in e.value.message and "round-0 state" in e.value.message
    assert model_view.model_data(st, 0, None)["stages"][0]["state"].sha256 == GOOD  # still exportable
    with pytest.raises(TransitionError) as e:
        model_view.model_data(st, 2, None)
    assert e.value.code == "not_published" and "latest is round 1" in e.value.message


def test_an_old_round_reads_its_next_rounds_archive():
    st, rng = make(1, samples_per_round=8, total_rounds=3, sync_mode=WHOLE_STATE), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    now = 1.0
    for sha in (GOOD, OTHER):
        now = _trained_round(st, rng, now + 1)
        merge_round(st, now, {"a": sha, "b": sha})
    assert st.round == 2 and model_view.needs_archive(st, 0) == 1 and model_view.needs_archive(st, 1) is None
    with pytest.raises(TransitionError) as e:
        model_view.model_data(st, 0, None)
    assert e.value.code == "not_kept"
    d = model_view.model_data(st, 0, st.dirty[("round", 1)])
    assert d["stages"][0]["state"].sha256 == GOOD and d["samples"] == 8
    assert model_view.model_data(st, 1, None)["stages"][0]["state"].sha256 == OTHER


def test_a_sharded_stage_without_a_decided_update_for_the_round_is_refused():
    st = make(2, sync_mode="sharded")
    st.round, st.phase = 1, Phase.TRAIN
    st.round_states = [dict(vars(StageState())) for _ in range(2)]
    st.sync = {"updates": {"0": {"0": [None]}}}  # stage 0 decided round 0 (kept its weights); stage 1 nothing
    with pytest.raises(TransitionError) as e:
        model_view.model_data(st, 0, None)
    assert e.value.code == "updates_pruned" and "stage 1" in e.value.message
    st.sync["updates"]["1"] = {"0": [{"sha256": GOOD, "size": 3, "key": "k"}]}
    d = model_view.model_data(st, 0, None)
    assert [x["state"] for x in d["stages"]] == [None, None]  # no checkpoint: the init, then the updates
    assert [x["updates"] for x in d["stages"]] == [[[None]], [[{"sha256": GOOD, "size": 3, "key": "k"}]]]
