"""A replica that restarts mid-round lost its inner steps: it sits out the rest of the round
(while its stage has a live peer), so a handful of late samples never enter the merge at a
2-replica stage's equal weight; a sole replica rejoins at once so the pipeline never stalls, and a
replica that registers again only to catch up (no work of its own in this round) is no restart."""
from __future__ import annotations

import random

from bridge import round_start, state
from bridge.routing import pick_replica
from tests.harness.bridge_state import drive, lease, make


def _two_replicas():
    st, rng = make(1, samples_per_round=32, total_rounds=3), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    now = 0.2
    for _ in range(4):  # both replicas work and step inside round 0
        now = drive(st, "ab", rng, now, max_iter=1, finish=False)
    assert st.phase == "train"
    return st, rng, now


def test_a_restarted_replica_sits_out_the_round_and_returns_for_the_next():
    st, rng, now = _two_replicas()
    assert st.miners["b"].round_steps > 0 or st.miners["b"].round_samples > 0
    state.register(st, "b", now, rng)  # the process died and came back
    b = st.miners["b"]
    assert b.sits_out_round == 0 and b.round_steps == 0
    assert lease(st, "b", now, rng, 2)[0] == "wait"
    picks = {pick_replica(st, 0, now, random.Random(i)) for i in range(20)}
    assert st.miners["b"] not in picks and picks <= {st.miners["a"], None}  # None: a is at its step quota
    now = drive(st, "ab", rng, now)  # the peer finishes the round alone
    assert st.phase == "merge" and st.workers[0] == ["a"], "the restarted replica is not a worker"
    round_start.start_round(st, 1, now)
    assert lease(st, "b", now + 0.1, rng, 2)[0] == "work", "next round it works again"


def test_registering_again_to_catch_up_is_not_a_restart():
    st, rng, now = _two_replicas()
    now = drive(st, "a", rng, now, skip="b")  # b did work in round 0 ... then round 1 starts
    round_start.start_round(st, 1, now)
    state.register(st, "b", now + 0.1, rng)  # b had done nothing in round 1: it just catches up
    assert st.miners["b"].sits_out_round == -1
    assert lease(st, "b", now + 0.2, rng, 2)[0] == "work"


def test_a_sole_replica_rejoins_at_once():
    st, rng = make(1, samples_per_round=8), random.Random(0)
    state.register(st, "a", 0.0, rng)
    lease(st, "a", 0.1, rng, 2)
    state.register(st, "a", 0.2, rng)
    assert st.miners["a"].sits_out_round == -1
    assert lease(st, "a", 0.3, rng, 2)[0] == "work"


def test_a_peer_lost_while_sitting_out_brings_it_back():
    st, rng, now = _two_replicas()
    state.register(st, "b", now, rng)
    st.miners["a"].active = False  # the peer left
    assert lease(st, "b", now, rng, 2)[0] == "work"


def test_two_replicas_that_both_restart_mid_round_do_not_wait_on_each_other():
    st, rng, now = _two_replicas()
    state.register(st, "b", now, rng)  # b restarts: a can take the round, so b sits out
    state.register(st, "a", now + 0.01, rng)  # then a restarts too: its only peer sits out
    assert st.miners["b"].sits_out_round == 0 and st.miners["a"].sits_out_round == -1
    assert lease(st, "a", now + 0.02, rng, 2)[0] == "work"
    now = drive(st, "ab", rng, now + 0.02)
    assert st.phase == "merge", "the stage halted: both replicas waited for the other"


def test_a_replica_beside_a_quarantined_peer_does_not_sit_out():
    st, rng, now = _two_replicas()
    a = st.miners["a"]
    a.quarantined_until = st.round + 4  # a validator failed a; b is in good standing
    assert st.quarantined(a, now)
    state.register(st, "b", now, rng)  # b restarts: its only peer gets no work, so b must not sit out
    assert st.miners["b"].sits_out_round == -1
    now = drive(st, "ab", rng, now)
    assert st.phase == "merge" and st.workers[0], "the stage halted"
