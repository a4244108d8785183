"""Who is charged for a bad hop output, and what is redone (bridge.claims, pure: no I/O)."""
from __future__ import annotations

import random

import pytest

from bridge import claims, state
from bridge.records import State, TransitionError
from protocol.errors import http_status
from tests.harness.bridge_state import make as harness_make

SHA = "ab" * 32
CODE = 422


def make(n_stages: int = 3, **over) -> State:
    cfg = dict(micro_batches_per_step=4, samples_per_round=4, max_object_bytes=4096)
    cfg.update(over)
    return harness_make(n_stages, code_bytes=CODE, **cfg)


def setup(n_stages=3, replicas=2, **over):
    """Miners a.. registered round-robin: stage s is served by hotkeys[s::n_stages]."""
    st, rng = make(n_stages, **over), random.Random(0)
    hks = [chr(ord("a") + i) for i in range(n_stages * replicas)]
    for hk in hks:
        state.register(st, hk, 0.0, rng)
    return st, rng


def sizes(st, hk):
    s, last = st.miners[hk].stage, st.run.n_stages - 1
    return (CODE if s < last else 0), (CODE if s > 0 else 0)


def take(st, hk, now, rng, n=1):
    """Lease for `hk` with the run's exact sizes."""
    return state.lease(st, hk, n, *sizes(st, hk), now, rng)[1]


def done(st, hk, hop, now, rng):
    state.complete(st, hk, hop.hop_id, SHA if hop.out_key else None, hop.out_size, 1.5, now, rng)


def open_hop(st, sample_id):
    """The sample's one open hop and the replica it is (or will be) leased to."""
    hops = [h for h in st.hops.values() if h.sample_id == sample_id
            and h.status in ("pool", "assigned", "leased")]
    assert len(hops) == 1, hops
    return hops[0]


def claim_it(st, hop, now, rng):
    """Have the replica the open hop is assigned to (or any of its stage) lease it."""
    if hop.status == "leased":
        return hop.leased_to
    cands = [hop.assigned_to] if hop.status == "assigned" else \
        [m.hotkey for m in st.stage_miners(hop.stage)]
    for hk in cands:
        if any(h.hop_id == hop.hop_id for h in take(st, hk, now, rng, 4)):
            return hk
    raise AssertionError(f"nobody leased {hop.hop_id}")


def run_to(st, rng, sample_id, stop, now):
    """Do the sample's hops honestly until `stop(hop)` is true for its open hop."""
    for _ in range(20):
        hop = open_hop(st, sample_id)
        hk = claim_it(st, hop, now, rng)
        if stop(hop):
            return hop, hk
        done(st, hk, hop, now, rng)
        now += 0.01
    raise AssertionError("never reached")


def first_fwd(st, rng, now=1.0):
    hop = take(st, "a", now, rng)[0]
    done(st, "a", hop, now, rng)
    return hop


def finish(st, rng, sample_id, now):
    for _ in range(20):
        if st.samples[sample_id].status != "active":
            return
        hop = open_hop(st, sample_id)
        hk = claim_it(st, hop, now, rng)
        done(st, hk, hop, now, rng)
    raise AssertionError("sample did not end")


def test_lying_forward_producer_is_charged_and_redone_elsewhere_sample_kept():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, consumer = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, 1.1)
    out = claims.judge_claim(st, consumer, c.hop_id, "bad_hash", "sha differs",
                             [(c.act_in, "bad", "sha256 mismatch")], 1.2, rng)
    assert out == "producer_charged"
    a, cons = st.miners["a"], st.miners[consumer]
    assert p.status == "rejected" and "bad output" in p.note
    assert a.bad_outputs == 1 and a.failures == 1 and a.health < 1.0 and a.open_graphs == 0
    assert cons.failures == cons.false_claims == 0 and cons.health == 1.0
    assert st.hops[c.hop_id].status == "failed"
    redo = open_hop(st, p.sample_id)
    assert (redo.stage, redo.kind, redo.attempt, redo.avoid) == (0, "fwd", 2, ("a",))
    assert st.samples[p.sample_id].fwd_done_stage == -1 and 0 not in st.samples[p.sample_id].fwd_by
    assert redo.hop_id not in [h.hop_id for h in take(st, "a", 9.0, rng, 4)]  # avoided
    assert claim_it(st, redo, 9.0, rng) == "d"
    finish(st, rng, p.sample_id, 9.1)
    assert st.samples[p.sample_id].status == "completed" and st.r_abandoned == 0


def test_false_claim_charges_the_consumer_and_retries_on_another_replica():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, consumer = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, 1.1)
    out = claims.judge_claim(st, consumer, c.hop_id, "nonfinite", "NaN!",
                             [(c.act_in, "ok", "sha256 matches, finite")], 1.2, rng)
    assert out == "consumer_charged"
    cons = st.miners[consumer]
    assert cons.false_claims == 1 and cons.failures == 1 and cons.health < 1.0
    assert st.miners["a"].bad_outputs == 0 and st.miners["a"].health == 1.0
    assert p.status == "done"
    retry = open_hop(st, p.sample_id)
    assert (retry.stage, retry.attempt, retry.act_in, retry.avoid) == (1, 2, c.act_in, (consumer,))
    assert claim_it(st, retry, 1.3, rng) != consumer
    finish(st, rng, p.sample_id, 1.4)
    assert st.samples[p.sample_id].status == "completed"


def test_lying_last_stage_gradient_redoes_the_fwdbwd_and_the_graph_holder_keeps_its_bwd():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, holder1 = run_to(st, rng, p.sample_id, lambda h: h.kind == "bwd" and h.stage == 1, 1.1)
    fb = st.hops[c.grad_in.key.rpartition("/")[2]]
    assert fb.kind == "fwdbwd" and not c.recompute
    liar = st.miners[fb.leased_to]
    assert liar.round_samples == 1
    out = claims.judge_claim(st, holder1, c.hop_id, "bad_shape", "", [(c.grad_in, "bad", "x")],
                             1.2, rng)
    assert out == "producer_charged" and liar.bad_outputs == 1
    assert liar.round_samples == 0  # the rejected backward earns no merge weight
    redo = open_hop(st, p.sample_id)
    assert (redo.stage, redo.kind, redo.attempt, redo.avoid) == (2, "fwdbwd", 2, (fb.leased_to,))
    assert redo.act_in == fb.act_in and st.fwd_pending[2] >= 1
    hk = claim_it(st, redo, 1.3, rng)
    assert hk != fb.leased_to
    done(st, hk, redo, 1.3, rng)
    bwd = open_hop(st, p.sample_id)
    assert bwd.kind == "bwd" and bwd.stage == 1 and not bwd.recompute
    assert bwd.assigned_to == holder1  # its forward graph was kept for the redo
    finish(st, rng, p.sample_id, 1.4)
    assert st.samples[p.sample_id].status == "completed"


def test_lying_middle_backward_is_recomputed_on_the_other_replica():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, _ = run_to(st, rng, p.sample_id, lambda h: h.kind == "bwd" and h.stage == 0, 1.1)
    liar = st.hops[c.grad_in.key.rpartition("/")[2]]
    assert liar.kind == "bwd" and liar.stage == 1
    claims.judge_claim(st, c.assigned_to, c.hop_id, "bad_hash", "",
                       [(c.grad_in, "bad", "sha")], 1.2, rng)
    redo = open_hop(st, p.sample_id)
    fwd1 = st.hops[st.samples[p.sample_id].fwd_by[1].hop_id]
    assert (redo.stage, redo.kind, redo.recompute, redo.attempt) == (1, "bwd", True, 2)
    assert redo.act_in == fwd1.act_in and redo.grad_in == liar.grad_in
    assert claim_it(st, redo, 1.3, rng) != liar.leased_to
    finish(st, rng, p.sample_id, 1.4)
    assert st.samples[p.sample_id].status == "completed" and st.r_abandoned == 0


def test_lost_object_is_redone_without_charging_anyone():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, consumer = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, 1.1)
    out = claims.judge_claim(st, consumer, c.hop_id, "missing", "",
                             [(c.act_in, "missing", "no object")], 1.2, rng)
    assert out == "redone"
    assert all(m.health == 1.0 and m.failures == 0 for m in st.miners.values())
    redo = open_hop(st, p.sample_id)
    assert (redo.stage, redo.attempt, redo.avoid) == (0, 2, ())


def test_claim_about_an_input_that_does_not_exist_is_false():
    st, rng = setup()
    hop = take(st, "a", 1.0, rng)[0]  # stage-0 fwd: its input is the public tokens
    assert claims.disputed_inputs(hop) == []
    out = claims.judge_claim(st, "a", hop.hop_id, "bad_hash", "", [], 1.1, rng)
    assert out == "consumer_charged" and st.miners["a"].false_claims == 1


def test_unchecked_claim_is_retried_at_no_cost_and_other_costs_a_failure_only():
    st, rng = setup()
    p = first_fwd(st, rng)
    c, consumer = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, 1.1)
    assert claims.judge_claim(st, consumer, c.hop_id, "bad_hash", "",
                              [(c.act_in, "unchecked", "no store")], 1.2, rng) == "retried"
    assert st.miners[consumer].failures == 0 and st.miners[consumer].health == 1.0
    c2, consumer2 = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, 1.3)
    assert consumer2 != consumer and c2.attempt == 2
    assert claims.judge_claim(st, consumer2, c2.hop_id, "other", "OOM", [], 1.4, rng) == "retried"
    m2 = st.miners[consumer2]
    assert m2.failures == 1 and m2.health == 1.0 and m2.false_claims == 0


def test_repeated_false_claims_abandon_only_when_the_budget_is_spent():
    st, rng = setup(n_stages=2, replicas=1, max_attempts=2)  # a: stage 0, b: stage 1 (alone)
    p = first_fwd(st, rng)
    now = 1.1
    for attempt in (1, 2):
        c, hk = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, now + 6 * attempt)
        assert (hk, c.attempt) == ("b", attempt)  # b is the only stage-1 replica: it gets it
        claims.judge_claim(st, "b", c.hop_id, "bad_hash", "", [(c.act_in, "ok", "fine")],
                           now + 6 * attempt, rng)
    s = st.samples[p.sample_id]
    assert s.status == "abandoned" and s.reason == "false claim: bad_hash after 2 attempts"
    assert st.miners["b"].false_claims == 2 and st.miners["a"].bad_outputs == 0


def test_repeated_bad_outputs_abandon_with_a_reason_after_max_attempts():
    st, rng = setup(n_stages=2, replicas=1, max_attempts=2, samples_per_round=1)
    now = 1.0
    for attempt in (1, 2):
        p = take(st, "a", now, rng)[0]  # a is the only stage-0 replica: the redo is its again
        assert p.attempt == attempt
        done(st, "a", p, now, rng)
        c, _ = run_to(st, rng, p.sample_id, lambda h: h.stage == 1, now)
        claims.judge_claim(st, "b", c.hop_id, "nonfinite", "", [(c.act_in, "bad", "NaN")],
                           now, rng)
        now += 6.0  # past a's back-off
    assert st.abandoned_total == 1 and st.abandon_reasons == {"bad output after 2 attempts": 1}
    assert st.miners["a"].bad_outputs == 2 and st.miners["b"].false_claims == 0


@pytest.mark.parametrize("fwd,bwd", [(10**6, CODE), (CODE + 1, CODE), (CODE, 64), (64, 64)])
def test_lease_sizes_must_be_the_runs_code_size(fwd, bwd):
    st, rng = setup()
    hk = [m.hotkey for m in st.stage_miners(1)][0]
    with pytest.raises(TransitionError) as e:
        state.lease(st, hk, 1, fwd, bwd, 1.0, rng)
    assert http_status(e.value.code) == 400
    assert e.value.code == "oversized" if fwd > 4096 else str(CODE) in e.value.message
    assert state.lease(st, "a", 1, CODE, 0, 1.0, rng)[0] == "work"


def test_bad_activation_found_by_a_recomputing_backward_rewinds_the_whole_forward():
    st, rng = setup()
    p = first_fwd(st, rng)  # a: stage 0
    _, holder1 = run_to(st, rng, p.sample_id, lambda h: h.stage == 1 and h.kind == "fwd", 1.1)
    done(st, holder1, open_hop(st, p.sample_id), 1.1, rng)
    st.miners[holder1].last_seen = -100.0  # the stage-1 graph holder goes silent
    c, who = run_to(st, rng, p.sample_id, lambda h: h.kind == "bwd" and h.stage == 1, 1.2)
    assert c.recompute and c.act_in.key == p.out_key and who != holder1
    pending = list(st.fwd_pending)
    out = claims.judge_claim(st, who, c.hop_id, "nonfinite", "",
                             [(c.act_in, "bad", "NaN"), (c.grad_in, "ok", "fine")], 1.3, rng)
    assert out == "producer_charged" and st.miners["a"].bad_outputs == 1
    s = st.samples[p.sample_id]
    assert s.fwd_done_stage == -1 and s.fwd_by == {}
    assert st.fwd_pending == [n + 1 for n in pending]  # every forward of it is pending again
    st.miners[holder1].last_seen = 1.3
    finish(st, rng, p.sample_id, 9.0)
    assert s.status == "completed" and st.r_abandoned == 0
    assert all(n >= 0 for n in st.fwd_pending)
