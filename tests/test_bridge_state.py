"""Bridge state machine transitions, without any I/O."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from bridge import round_start, state
from bridge.records import State, TransitionError
from protocol.errors import http_status
from tests.harness.bridge_state import do_hop, drive, lease, make



def test_assignment_balances_stages_and_round_starts_when_every_stage_is_served():
    st, rng = make(3), random.Random(0)
    stages = [state.register(st, f"m{i}", 0.0, rng).stage for i in range(5)]
    assert stages == [0, 1, 2, 0, 1]
    assert st.phase == "train" and len(st.samples) == 8
    assert len(st.fwd_pool[0]) == 8


def test_waiting_until_every_stage_has_a_miner():
    st, rng = make(2), random.Random(0)
    state.register(st, "a", 0.0, rng)
    assert lease(st, "a", 1.0, rng)[0] == "wait" and st.phase == "waiting"
    with pytest.raises(TransitionError) as e:
        lease(st, "nobody", 1.0, rng)
    assert http_status(e.value.code) == 409


def test_lease_done_creates_next_stage_hop_and_backward_returns_to_forward_replica():
    st, rng = make(2), random.Random(0)
    for hk in "abcd":
        state.register(st, hk, 0.0, rng)
    action, hops, _ = lease(st, "a", 1.0, rng)
    assert action == "work" and hops[0].kind == "fwd" and hops[0].stage == 0
    fwd = hops[0]
    assert fwd.out_key == f"runs/t/r0/s0/act/{fwd.hop_id}" and fwd.out_size == 100
    do_hop(st, "a", fwd, 1.5, rng)
    nxt = [h for h in st.hops.values() if h.stage == 1]
    assert len(nxt) == 1 and nxt[0].kind == "fwdbwd" and nxt[0].act_in.key == fwd.out_key
    target = nxt[0].assigned_to or "b"
    _, hops, _ = lease(st, target, 2.0, rng)
    do_hop(st, target, hops[0], 2.5, rng)
    bwd = [h for h in st.hops.values() if h.kind == "bwd"][0]
    assert bwd.assigned_to == "a" and not bwd.recompute and bwd.fwd_hop_id == fwd.hop_id
    with pytest.raises(TransitionError) as e:
        state.complete(st, "b", bwd.hop_id, None, 0, None, 3.0, rng)
    assert http_status(e.value.code) == 409  # assigned, not leased to b
    action, hops, _ = lease(st, "a", 3.0, rng)
    assert hops[0].hop_id == bwd.hop_id and hops[0].out_key is None  # bwd first, stage 0
    do_hop(st, "a", hops[0], 3.2, rng)
    assert st.samples[fwd.sample_id].status == "completed"
    with pytest.raises(TransitionError) as e:
        do_hop(st, "a", hops[0], 3.3, rng)
    assert http_status(e.value.code) == 409  # applied once


def test_routing_distribution_follows_throughput_and_is_seeded():
    def picks(seed):
        st, rng = make(2, micro_batches_per_step=4096, samples_per_round=4000), random.Random(seed)
        for hk in ("a", "fast", "b", "slow"):
            state.register(st, hk, 0.0, rng)
        assert st.miners["fast"].stage == st.miners["slow"].stage == 1
        st.miners["fast"].throughput, st.miners["slow"].throughput = 9.0, 1.0
        got = Counter()
        for _ in range(2000):
            _, hops, _ = lease(st, "a", 1.0, rng)
            do_hop(st, "a", hops[0], 1.0, rng)
            new = [h for h in st.hops.values() if h.stage == 1 and h.status == "assigned"][-1]
            got[new.assigned_to] += 1
            st.unplace(new)
            new.status = "dropped"
        return got
    a, b = picks(1), picks(1)
    assert a == b  # seeded: reproducible
    assert 0.85 < a["fast"] / sum(a.values()) < 0.95


def test_quota_then_step_then_quota_resets():
    st, rng = make(1, samples_per_round=5), random.Random(0)
    state.register(st, "a", 0.0, rng)
    action, hops, _ = lease(st, "a", 1.0, rng, 5)
    assert action == "work" and len(hops) == 2 and all(h.kind == "fwdbwd" for h in hops)
    assert lease(st, "a", 1.1, rng)[0] == "wait"  # quota used, hops still leased
    for h in hops:
        do_hop(st, "a", h, 1.2, rng)
    assert lease(st, "a", 1.3, rng)[0] == "step"
    with pytest.raises(TransitionError):
        state.step_done(st, "a", 0, 0, 5, 1.4)  # wrong sample count
    state.step_done(st, "a", 0, 0, 2, 1.4)
    state.step_done(st, "a", 0, 0, 2, 1.5)  # retry of the same report: no-op
    assert st.miners["a"].inner_step == 1
    action, hops, _ = lease(st, "a", 1.6, rng, 5)
    assert action == "work" and len(hops) == 2


def test_lease_expiry_releases_to_another_replica_with_penalty():
    st, rng = make(2), random.Random(0)
    for hk in "abcd":
        state.register(st, hk, 0.0, rng)
    _, hops, _ = lease(st, "a", 1.0, rng)
    h = hops[0]
    state.lease(st, "c", 1, 100, 100, 12.0, rng)  # time passes beyond the deadline
    assert st.hops[h.hop_id].status == "expired"
    retry = [x for x in st.hops.values() if x.sample_id == h.sample_id and x.attempt == 2]
    assert len(retry) == 1 and retry[0].status in ("pool", "leased")
    assert st.miners["a"].expiries == 1 and st.miners["a"].health < 1.0
    assert st.miners["a"].backoff_until > 12.0
    with pytest.raises(TransitionError) as e:
        do_hop(st, "a", h, 12.5, rng)
    assert http_status(e.value.code) == 409


def test_abandon_after_max_attempts_and_round_still_closes():
    st, rng = make(1, samples_per_round=2, max_attempts=2, micro_batches_per_step=4), random.Random(0)
    state.register(st, "a", 0.0, rng)
    _, hops, _ = lease(st, "a", 1.0, rng, 1)
    now = 20.0
    lease(st, "a", now, rng, 0 + 1)  # expire attempt 1 (a is backing off: gets nothing)
    now = 26.0
    _, hops, _ = lease(st, "a", now, rng, 2)
    assert sorted(h.attempt for h in hops) == [1, 2]
    do_hop(st, "a", [h for h in hops if h.attempt == 1][0], now, rng)
    lease(st, "a", now + 11, rng)  # attempt 2 expires -> abandoned
    assert st.r_abandoned == 1 and st.r_completed == 1
    assert st.phase == "merge" and "lease expired after 2 attempts" in st.abandon_reasons


def test_dead_forward_replica_means_recompute_elsewhere():
    st, rng = make(2, micro_batches_per_step=4), random.Random(0)
    for hk in "abcd":
        state.register(st, hk, 0.0, rng)  # a, c stage 0; b, d stage 1
    _, hops, _ = lease(st, "a", 1.0, rng)
    do_hop(st, "a", hops[0], 1.0, rng)
    st.miners["a"].last_seen = -100.0  # a goes silent
    nxt = [h for h in st.hops.values() if h.stage == 1][0]
    hk = nxt.assigned_to or "b"
    _, got, _ = lease(st, hk, 2.0, rng)
    do_hop(st, hk, got[0], 2.0, rng)
    bwd = [h for h in st.hops.values() if h.kind == "bwd"][0]
    assert bwd.recompute and bwd.assigned_to == "c" and bwd.act_in is None  # stage 0: tokens
    assert st.stage_counters[0]["reroutes"] == 1
    assert st.miners["a"].open_graphs == 0


def test_rejoin_keeps_stage_and_releases_leases():
    st, rng = make(2), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    _, hops, _ = lease(st, "a", 1.0, rng, 2)
    m = state.register(st, "a", 2.0, rng)
    assert m.stage == 0 and m.epoch == 1 and m.quota_used == 0
    assert all(st.hops[h.hop_id].status == "expired" for h in hops)
    assert sum(1 for h in st.hops.values() if h.attempt == 2) == 2


def test_samples_are_minted_in_chunks_and_all_complete(monkeypatch):
    monkeypatch.setattr(round_start, "MINT_CHUNK", 4)
    st, rng = make(2, samples_per_round=10), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    assert st.minted == 4 and sorted(st.samples) == [0, 1, 2, 3]
    drive(st, "ab", rng, 1.0)
    assert st.minted == 10 and sorted(st.samples) == list(range(10))
    assert st.phase == "merge" and st.r_completed == 10 and st.r_abandoned == 0
    restored = State(run=st.run)
    restored.load_meta(json.loads(json.dumps(st.meta_dict())))
    assert restored.minted == 10


def test_declared_numerics_are_stamped_on_every_leased_hop_and_follow_a_rejoin():
    from bridge import views
    st, rng = make(2), random.Random(0)
    state.register(st, "a", 0.0, rng, ("cuda", "bfloat16"))
    state.register(st, "b", 0.0, rng)
    _, hops, _ = lease(st, "a", 1.0, rng)
    do_hop(st, "a", hops[0], 1.5, rng)
    rec = views.hop_record(st.hops[hops[0].hop_id], lambda key, ttl: f"http://s/{key}", 60.0)
    assert (rec.device_class, rec.compute_dtype) == ("cuda", "bfloat16")
    state.register(st, "a", 2.0, rng, ("cpu", "float32"))  # restarted on another device
    _, hops, _ = lease(st, "a", 3.0, rng)
    assert (hops[0].device_class, hops[0].compute_dtype) == ("cpu", "float32")
    assert (st.miners["b"].device_class, st.miners["b"].compute_dtype) == ("cpu", "float32")


def test_open_graph_bound_holds_back_pooled_forwards_until_backwards_free_graphs():
    st, rng = make(2, micro_batches_per_step=6, samples_per_round=12), random.Random(0)
    state.register(st, "s0", 0.0, rng)
    state.register(st, "s1", 0.0, rng)
    action, hops, _ = state.lease(st, "s0", 8, 100, 100, 1.0, rng, 2)  # may hold 2 graphs
    assert action == "work" and [h.kind for h in hops] == ["fwd", "fwd"]
    assert state.lease(st, "s0", 8, 100, 100, 1.1, rng, 2)[0] == "wait"  # 2 forwards held: no third
    for h in hops:
        do_hop(st, "s0", h, 1.2, rng)
    assert st.miners["s0"].open_graphs == 2
    assert state.lease(st, "s0", 8, 100, 100, 1.3, rng, 2)[0] == "wait"  # 2 graphs open: still none
    _, last, _ = lease(st, "s1", 1.4, rng, 8)
    do_hop(st, "s1", last[0], 1.5, rng)  # one fwdbwd: its backward comes back to s0
    action, got, _ = state.lease(st, "s0", 8, 100, 100, 1.6, rng, 2)
    assert [h.kind for h in got] == ["bwd"]  # the backward, and no forward: its graph is still open
    do_hop(st, "s0", got[0], 1.7, rng)
    action, got, _ = state.lease(st, "s0", 8, 100, 100, 1.8, rng, 2)
    assert [h.kind for h in got] == ["fwd"]  # one graph freed: one forward more
    unbounded = state.lease(st, "s0", 8, 100, 100, 1.9, rng)[1]  # without a bound: the rest of the quota
    assert [h.kind for h in unbounded] == ["fwd"] * 3


def test_a_miners_own_backward_done_wakes_its_parked_lease():
    st, rng = make(1, samples_per_round=2), random.Random(0)
    state.register(st, "a", 0.0, rng)
    _, hops, _ = lease(st, "a", 1.0, rng, 2)
    do_hop(st, "a", hops[0], 1.1, rng)
    st.wake = {}
    do_hop(st, "a", hops[1], 1.2, rng)  # its last hop: the answer to a parked lease is now `step`
    assert ("miner", "a") in st.wake
    assert lease(st, "a", 1.3, rng)[0] == "step"
