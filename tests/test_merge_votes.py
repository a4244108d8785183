"""Votes on merged states, disputes, arbitration, quarantine and write-once keys (pure state
machine, no servers): one liar never decides what is published."""
from __future__ import annotations

import json
import random

import pytest

from bridge import quarantine, rounds, state, votes
from bridge.records import State, TransitionError
from protocol.errors import http_status
from tests.harness.bridge_state import drive, lease, make, merge_round
from tests.harness.bridge_state import report_pseudograd as _pg
from tests.harness.bridge_state import vote_state as _vote

WHOLE_STATE = {"sync_mode": "state"}  # these votes are the whole-state merge's (the sharded ones: test_shard_votes)


def _round(n_stages=1, miners="ab", **over):
    st, rng = make(n_stages, samples_per_round=4 * len(miners), **{**WHOLE_STATE, **over}), random.Random(0)
    for hk in miners:
        state.register(st, hk, 0.0, rng)
    return st, rng, drive(st, miners, rng, 1.0)


GOOD, BAD = "5" * 64, "0" * 64  # BAD sorts first: a hash-order tie-break would pick it


def test_a_unanimous_set_publishes_with_every_agreeing_copy():
    st, rng, now = _round(miners="abc")
    out = merge_round(st, now, {"a": GOOD, "c": GOOD, "b": GOOD})
    assert out["b"] is True and st.round == 1
    ss = st.stage_states[0]
    assert ss.sha256 == GOOD and ss.key.endswith(f"/state/a-{GOOD}")
    assert sorted(ss.alt_keys) == [f"runs/t/r1/s0/state/{h}-{GOOD}" for h in "bc"]  # each voter's own copy
    assert st.dirty[("round", 0)]["flagged"] == []


def test_a_colluding_majority_does_not_publish_against_a_dissenting_member():
    """Two of three members (one owner's sybils) vote their own state first: the honest member's
    dissent makes it a dispute, and the validator's recomputation publishes the honest state."""
    st, rng, now = _round(miners="abc")
    out = merge_round(st, now, {"b": BAD, "c": BAD, "a": GOOD})
    assert set(out.values()) == {None} and st.round == 0 and 0 in st.disputes
    assert votes.arbitrate(st, "val", 0, 0, GOOD, now + 1) is True
    assert st.round == 1 and st.stage_states[0].sha256 == GOOD
    assert sorted(st.dirty[("round", 0)]["flagged"]) == ["b", "c"]


def test_a_one_one_split_is_a_dispute_not_a_tie_break():
    st, rng, now = _round()
    out = merge_round(st, now, {"a": GOOD, "b": BAD})
    assert out == {"a": None, "b": None} and st.round == 0 and 0 in st.disputes
    (d,) = votes.open_disputes(st)
    assert d["votes"] == {"a": GOOD, "b": BAD} and [i["hotkey"] for i in d["items"]] == ["a", "b"]
    assert votes.arbitrate(st, "val", 0, 0, GOOD, now + 1) is True
    assert st.round == 1 and st.stage_states[0].sha256 == GOOD
    assert st.dirty[("round", 0)]["flagged"] == ["b"]
    with pytest.raises(TransitionError) as e:  # settled once
        votes.arbitrate(st, "val", 0, 0, BAD, now + 2)
    assert e.value.code == "no_dispute"


def test_arbitration_that_agrees_with_nobody_keeps_the_previous_state():
    st, rng, now = _round()
    merge_round(st, now, {"a": GOOD, "b": BAD})
    assert votes.arbitrate(st, "val", 0, 0, "7" * 64, now + 1) is False
    assert st.round == 1 and st.stage_states[0].sha256 is None  # round 0 state: init
    assert sorted(st.dirty[("round", 0)]["flagged"]) == ["a", "b"]


def test_no_arbitration_by_the_deadline_keeps_the_previous_state():
    st, rng, now = _round(arbitration_timeout_seconds=30.0)
    merge_round(st, now, {"a": GOOD, "b": BAD})
    state.tick(st, now + 29.0, rng)
    assert st.round == 0
    state.tick(st, now + 31.0, rng)
    assert st.round == 1 and st.stage_states[0].sha256 is None


def test_a_silent_member_opens_a_dispute_at_the_vote_timeout():
    st, rng, now = _round(miners="abcd", vote_timeout_seconds=20.0)
    out = merge_round(st, now, {"a": GOOD, "b": GOOD})  # 2 of 4, 2 silent: no strict majority
    assert set(out.values()) == {None}
    state.tick(st, now + 19.0, rng)
    assert not st.disputes
    state.tick(st, now + 21.0, rng)
    assert 0 in st.disputes and st.round == 0  # no hash order and no group size settles it
    votes.arbitrate(st, "val", 0, 0, GOOD, now + 22)
    assert st.stage_states[0].sha256 == GOOD and st.stage_states[0].alt_keys


def test_an_undisputed_majority_publishes_at_the_vote_timeout_when_the_rest_is_silent():
    st, rng, now = _round(miners="abcd", vote_timeout_seconds=20.0)
    merge_round(st, now, {"a": GOOD, "b": GOOD, "c": GOOD})  # d is silent
    assert st.round == 0
    state.tick(st, now + 21.0, rng)
    assert st.round == 1 and st.stage_states[0].sha256 == GOOD and not st.disputes


def test_no_vote_at_all_keeps_the_previous_state_at_the_vote_timeout():
    st, rng, now = _round(vote_timeout_seconds=20.0)
    merge_round(st, now, {})
    state.tick(st, now + 21.0, rng)
    assert st.round == 1 and st.stage_states[0].sha256 is None and st.flagged == []


def test_merge_weights_are_the_bridges_verified_counts():
    st, rng, now = _round(miners="ab")
    merge_round(st, now, {})
    counted = {h: m.round_samples for h, m in st.miners.items()}
    done = {h: sum(1 for x in st.hops.values() if x.leased_to == h and x.status == "done"
                   and x.kind in ("bwd", "fwdbwd")) for h in "ab"}
    assert counted == done and sum(counted.values()) == 8
    assert {i["hotkey"]: i["samples"] for i in rounds.merge_set(st, 0, 0)} == counted


def test_report_keys_are_checked_before_anything_else_and_are_per_writer():
    st, rng, now = _round()
    key_a = rounds.merge_upload_key(st, "a", 0, "pseudograd", GOOD)
    assert "/upload/a/" in key_a and key_a != rounds.merge_upload_key(st, "b", 0, "pseudograd", GOOD)
    for bad in (key_a, "x" * 500, "runs/t/r0/s0/pg/a-" + GOOD, "../../etc"):
        with pytest.raises(TransitionError) as e:  # b naming a's key, or nonsense: same answer
            rounds.check_upload_key(st, "b", 0, "pseudograd", bad, GOOD)
        assert (http_status(e.value.code), e.value.code) == (400, "bad_key")
    final = rounds.final_key(st, "a", 0, "state", GOOD)
    assert final == f"runs/t/r1/s0/state/a-{GOOD}" and "/upload/" not in final


def test_a_late_merged_report_names_its_own_staging_key_and_gets_the_published_state():
    st, rng, now = _round(miners="abc")
    merge_round(st, now, {"a": GOOD, "b": GOOD, "c": GOOD})
    assert st.round == 1  # round 0 is over: its votes come late
    late = f"runs/t/r0/s0/upload/c/state-{GOOD}"  # the staging key c was granted in round 0
    stage, ss = rounds.published_state(st, "c", 0, GOOD, late, None)
    assert stage == 0 and ss.sha256 == GOOD and ss.round == 1
    for bad in (f"runs/t/r0/s0/upload/a/state-{GOOD}", f"runs/t/r1/s0/state/c-{GOOD}", "z" * 300):
        with pytest.raises(TransitionError) as e:  # another's key, a final key, nonsense
            rounds.published_state(st, "c", 0, GOOD, bad, None)
        assert e.value.code == "bad_key"


def test_a_vote_cannot_be_changed_and_outsiders_cannot_vote():
    st, rng, now = _round(miners="abc")
    merge_round(st, now, {"a": GOOD})
    with pytest.raises(TransitionError) as e:
        _vote(st, "a", BAD, now)
    assert e.value.code == "already_voted"
    st.miners["c"].stage = 0
    st.frozen[0] = ["a", "b"]
    with pytest.raises(TransitionError) as e:
        _vote(st, "c", GOOD, now)
    assert e.value.code == "not_in_merge_set"


def test_a_failed_verdict_quarantines_work_and_merge_then_expires():
    st, rng = make(1, samples_per_round=8, total_rounds=5, quarantine_rounds=2, **WHOLE_STATE), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    until = quarantine.record_verdict(st, "val", 0, "b", False, "audit failed")
    assert until == 3 and st.quarantined(st.miners["b"])
    assert lease(st, "b", 1.0, rng)[0] == "wait"
    drive(st, "ab", rng, 1.0)
    assert st.workers[0] == ["a"]  # b did nothing this round
    assert quarantine.record_verdict(st, "val", 0, "a", True, "") == -1
    with pytest.raises(TransitionError) as e:
        quarantine.record_verdict(st, "val", 9, "a", False, "x")
    assert e.value.code == "future_round"
    st.round = 3
    assert not st.quarantined(st.miners["b"])


def test_a_quarantined_worker_does_not_hold_the_merge_set_open():
    st, rng, now = _round()
    quarantine.record_verdict(st, "val", 0, "b", False, "merge check failed")
    _pg(st, "a", now)
    assert st.frozen[0] == ["a"]  # b's report is not awaited
    with pytest.raises(TransitionError) as e:
        _pg(st, "b", now)
    assert e.value.code in ("quarantined", "frozen")


def test_dispute_state_survives_a_restart():
    st, rng, now = _round()
    merge_round(st, now, {"a": GOOD, "b": BAD})
    restored = State(run=st.run)
    restored.load_meta(json.loads(json.dumps(st.meta_dict())))
    assert restored.disputes == st.disputes and 0 in restored.disputes


def test_a_late_vote_of_a_member_is_kept_as_evidence_once():
    archive = {"pseudograds": [{"hotkey": "a", "stage": 0}, {"hotkey": "b", "stage": 0}],
               "votes": [{"hotkey": "a", "stage": 0, "sha256": GOOD}]}
    assert votes.add_late_vote(archive, "b", 0, BAD) is True
    assert votes.add_late_vote(archive, "b", 0, GOOD) is False  # the first one stands
    assert votes.add_late_vote(archive, "a", 0, BAD) is False
    assert votes.add_late_vote(archive, "z", 0, BAD) is False  # not in the merge set
    assert archive["votes"][-1] == {"hotkey": "b", "stage": 0, "sha256": BAD}


def test_a_withheld_report_holds_the_merge_set_only_for_the_grace_period():
    st, rng, now = _round(miners="ab", vote_timeout_seconds=10.0, merge_timeout_seconds=300.0)
    _pg(st, "a", now)  # b did work but never reports
    assert 0 not in st.frozen and st.report_grace[0] == now + 10.0
    state.tick(st, now + 9.0, rng)
    assert 0 not in st.frozen
    state.tick(st, now + 10.5, rng)
    assert st.frozen[0] == ["a"]  # long before the 300 s merge timeout


def test_a_replica_that_registers_again_after_its_work_merges_nothing():
    """Its weight is the backwards verified since its last registration: none after registering
    again, so its report is refused (no weight in the merge, no credit) and the set does not wait
    for it; a peer that did not re-register reports as usual."""
    st, rng, now = _round(miners="ab")
    assert st.miners["a"].round_samples > 0 and "a" in st.workers[0]
    state.register(st, "a", now, rng)  # between its work and its report
    with pytest.raises(TransitionError) as e:
        _pg(st, "a", now)
    assert e.value.code == "no_work" and http_status(e.value.code) == 409 and "registration" in e.value.message
    _pg(st, "b", now)
    assert st.frozen[0] == ["b"] and st.pseudograds[0]["b"]["samples"] > 0  # "a" is not awaited
