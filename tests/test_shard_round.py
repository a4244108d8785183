"""The bridge's sharded round (pure state machine, no servers): pieces enter the merge set with
verified weights, per-shard ballots survive a restart (the meta row's JSON), a complete ballot
publishes the stage, checkpoint rounds wait for the whole-state vote, and one liar per shard is
outvoted (R = 3) or settled by a validator (R = 2)."""
from __future__ import annotations

import json
import random

import pytest

from bridge import shard_round, state, votes
from bridge.records import State, TransitionError
from bridge.shard_votes import KEEP_SHA
from bridge import rounds
from protocol.keys import PieceKey, UpdateKey
from tests.harness.bridge_state import drive, make

GOOD, LIE = "5" * 64, "0" * 64


def _round(miners="abc", **over):
    over = {"sync_mode": "sharded", "sync_shards": 2, "sync_mergers": 3, "checkpoint_every": 2, **over}
    st, rng = make(1, samples_per_round=4 * len(miners), **over), random.Random(0)
    for hk in miners:
        state.register(st, hk, 0.0, rng)
    return st, rng, drive(st, miners, rng, 1.0)


def _pieces(st, now):
    for hk in sorted(st.miners):
        m = st.miners[hk]
        if m.step_samples:
            state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)
        shas = [f"{hk}{s}".ljust(64, "f")[:64] for s in range(st.run.sync_shards)]
        finals = [PieceKey(st.run.run_id, st.round, m.stage, hk, s, sha).final for s, sha in enumerate(shas)]
        rounds.report_pieces(st, hk, st.round, shas, [10, 10], finals, now)


def _vote(st, hk, sha, now, shards=(0, 1)):
    stage, size = st.miners[hk].stage, 0 if sha == KEEP_SHA else 9
    return shard_round.vote(st, hk, st.round, [(s, sha, UpdateKey(st.run.run_id, st.round, stage, s, hk, sha).final, size)
                                               for s in shards], now)


def _restart(st: State) -> State:
    """What the bridge reloads after a restart: the meta row through JSON."""
    fresh = make(1, **{k: getattr(st.run, k) for k in ("sync_mode", "sync_shards", "sync_mergers",
                                                       "checkpoint_every", "samples_per_round")})
    fresh.miners = st.miners
    fresh.load_meta(json.loads(json.dumps(st.meta_dict())))
    return fresh


def test_pieces_join_the_merge_set_with_verified_weights_and_a_bad_count_is_refused():
    st, _, now = _round()
    with pytest.raises(TransitionError) as e:
        rounds.report_pieces(st, "a", st.round, [GOOD], [10], ["k"], now)
    assert e.value.code == "bad_shards"
    _pieces(st, now)
    rec = st.pseudograds[0]["a"]
    assert rec["shards"][0].startswith("a0") and rec["samples"] == st.miners["a"].round_samples > 0
    assert rec["sha256"] == shard_round.pieces_sha(rec["shards"])


def test_every_merger_agreeing_decides_each_shard_and_ballots_survive_a_restart():
    st, _, now = _round(checkpoint_every=5)
    _pieces(st, now)
    b = shard_round.ballot(st, 0, 0, now)
    assert all(sorted(m) == ["a", "b", "c"] for m in b.mergers)
    assert _vote(st, "a", GOOD, now) == {0: None, 1: None}
    st = _restart(st)  # the votes cast so far are in the persisted meta row
    assert _vote(st, "b", GOOD, now) == {0: None, 1: None}  # 2 of 3 agree: not yet
    assert _vote(st, "c", GOOD, now) == {0: True, 1: True}
    assert st.round == 1 and st.published == {}  # published at once: not a checkpoint round
    assert [d["sha256"] for d in st.sync["updates"]["0"]["0"]] == [GOOD, GOOD]
    assert shard_round.published_round(st, 0) == 1
    assert shard_round.updates_since(st, 0, 0, 1)[0][1]["key"] in (
        UpdateKey("t", 0, 0, 1, "a", GOOD).final, UpdateKey("t", 0, 0, 1, "b", GOOD).final, UpdateKey("t", 0, 0, 1, "c", GOOD).final)


def test_two_colluding_mergers_of_three_cannot_decide_against_the_honest_one():
    st, _, now = _round(checkpoint_every=5)
    _pieces(st, now)
    _vote(st, "a", LIE, now)  # one owner's sybils vote first and agree
    _vote(st, "b", LIE, now)
    assert st.round == 0 and not st.sync.get("updates")  # 2 of 3 is not enough to decide
    assert _vote(st, "c", GOOD, now) == {0: None, 1: None}  # the honest dissent: a dispute per shard
    assert {d["shard"] for d in shard_round.open_disputes(st)} == {0, 1}
    for shard in (0, 1):  # the validator's recomputation agrees with the honest merger
        assert shard_round.arbitrate(st, "v", 0, 0, shard, GOOD, now) is True
    assert st.round == 1
    assert [d["sha256"] for d in st.sync["updates"]["0"]["0"]] == [GOOD, GOOD]
    assert sorted(st.dirty[("round", 0)]["flagged"]) == ["a", "b"]


def test_at_the_vote_deadline_an_undisputed_majority_decides_and_a_dissent_does_not():
    st, rng, now = _round(checkpoint_every=5, vote_timeout_seconds=20.0)
    _pieces(st, now)
    _vote(st, "a", GOOD, now, shards=(0, 1))
    _vote(st, "b", GOOD, now, shards=(0,))
    _vote(st, "c", LIE, now, shards=(0,))  # shard 0 disputed; shard 1: a alone, b and c silent
    assert {d["shard"] for d in shard_round.open_disputes(st)} == {0}
    _vote(st, "b", GOOD, now, shards=(1,))  # shard 1: 2 of 3 agree, c silent
    shard_round.on_time(st, 0, now + 19.0)
    assert 1 not in shard_round.stored_ballot(st, 0, 0).decided
    shard_round.on_time(st, 0, now + 21.0)
    b = shard_round.stored_ballot(st, 0, 0)
    assert b.decided[1]["sha256"] == GOOD and 0 not in b.decided and 0 in b.disputes


def test_two_replicas_split_is_a_dispute_only_a_validator_settles_then_keep_on_silence():
    st, _, now = _round(miners="ab", checkpoint_every=5)
    _pieces(st, now)
    _vote(st, "a", GOOD, now)
    _vote(st, "b", LIE, now)
    assert {d["shard"] for d in shard_round.open_disputes(st)} == {0, 1}
    assert shard_round.arbitrate(st, "v", 0, 0, 0, GOOD, now) is True
    assert st.round == 0  # shard 1 still disputed
    shard_round.on_time(st, 0, now + st.run.arbitration_timeout_seconds + 1)  # nobody settles it: kept
    assert st.round == 1
    upd = st.sync["updates"]["0"]["0"]
    assert upd[0]["sha256"] == GOOD and upd[1] is None


def test_a_checkpoint_round_publishes_only_on_the_state_vote():
    st, _, now = _round(miners="ab", checkpoint_every=1)
    _pieces(st, now)
    _vote(st, "a", KEEP_SHA, now)
    _vote(st, "b", KEEP_SHA, now)
    assert st.sync["updates"]["0"]["0"] == [None, None] and st.round == 0  # waits for the checkpoint
    for hk in "ab":  # the whole-state vote on the checkpoint, through its write-once key
        final = rounds.check_upload_key(st, hk, 0, "state", rounds.merge_upload_key(st, hk, 0, "state", GOOD), GOOD)
        votes.report_merged(st, hk, 0, GOOD, final, 7, now)
    assert st.round == 1 and st.stage_states[0].sha256 == GOOD and st.stage_states[0].round == 1


def test_a_vote_for_a_shard_out_of_range_is_refused_and_the_state_mode_refuses_sharded_reports():
    st, _, now = _round(miners="ab", checkpoint_every=5)
    _pieces(st, now)
    with pytest.raises(TransitionError) as e:
        shard_round.vote(st, "a", st.round, [(7, GOOD, "k", 9)], now)
    assert e.value.code == "bad_shard"
    plain, _, now = _round(sync_mode="state")
    with pytest.raises(TransitionError) as e:
        rounds.report_pieces(plain, "a", plain.round, [GOOD, GOOD], [1, 1], ["k", "k"], now)
    assert e.value.code == "not_sharded"


def test_reported_shard_sha256s_must_be_hex_so_no_key_can_be_steered():
    from pydantic import ValidationError
    from protocol.sync_api import SyncPseudograd
    for bad in ("../" * 21 + "x", "A" * 64, "a" * 63):
        with pytest.raises(ValidationError):
            SyncPseudograd(round=0, shas=[bad], sizes=[1])
    assert SyncPseudograd(round=0, shas=[GOOD], sizes=[1]).shas == [GOOD]


def test_a_round_nobody_reported_is_logged_as_kept_so_later_views_and_catch_ups_still_work():
    """A stage whose merge set froze empty (every replica withheld, crashed or had no work) keeps its
    state; the round's update is logged as all kept, so the next round's view, which lists every
    update since the checkpoint, does not answer `updates_pruned` for ever (seen in CI: the stage halted)."""
    st, rng, now = _round("ab", merge_timeout_seconds=5.0)
    for hk in "ab":  # both replicas step, then neither reports its pieces
        m = st.miners[hk]
        if m.step_samples:
            state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)
    rnd = st.round
    rounds.maybe_freeze(st, now + 6.0)  # the merge timeout passes with an empty set
    assert st.round == rnd + 1, "the stage kept its state and the run went on"
    assert shard_round.updates_since(st, 0, 0, st.round)[rnd] == [None, None]
    now = drive(st, "ab", rng, now + 6.1)  # the next round trains and reaches its merge
    _pieces(st, now)
    assert len(shard_round.updates_since(st, 0, 0, st.round)) == st.round
