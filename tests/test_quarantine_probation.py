"""No verdict halts a stage: quarantine never leaves a stage without a live replica (its last
failed replicas keep it training on probation, unpaid), and a round that trained nothing does not
count as progress. Pure state machine first, then the real bridge with fake workers."""
from __future__ import annotations

import hashlib
import random
import threading

import httpx

from bridge import quarantine, round_start, rounds, state
from bridge.dashboard import dashboard_state
from bridge.views import metrics
from protocol.integrity import Verdict, VerdictReport
from protocol.bridge_client import BridgeClient
from protocol.lifecycle import Phase
from protocol.routes import route
from tests.harness.bridge_state import drive, lease, make
from tests.harness.fake_worker import FakeWorker
from tests.harness.waiting import wait_for
from tests.servers import make_chain, start_bridge, tiny_run_config

_CONSOLE = {"validators": {}, "audits": {}, "verdicts": []}


def _report_pg(st, hk, now):
    sha = hashlib.sha256(hk.encode()).hexdigest()
    final = rounds.check_upload_key(st, hk, st.round, "pseudograd",
                                    rounds.merge_upload_key(st, hk, st.round, "pseudograd", sha), sha)
    rounds.report_pseudograd(st, hk, st.round, final, sha, 10, now)


def test_the_only_replica_of_a_stage_keeps_training_after_a_failed_verdict_unpaid():
    # the whole-state report path (_report_pg); the sharded one reports pieces
    st, rng = make(1, samples_per_round=4, total_rounds=4, quarantine_rounds=2, sync_mode="state"), random.Random(0)
    state.register(st, "a", 0.0, rng)
    assert quarantine.record_verdict(st, "val", 0, "a", False, "rel err 0.3 > 0.2") == 3
    m = st.miners["a"]
    assert st.failed_audit(m) and not st.quarantined(m, 1.0) and st.on_probation(m, 1.0)
    action, hops, _ = lease(st, "a", 1.0, rng)
    assert action == "work" and hops and st.unpaid == ["a"]
    now = drive(st, "a", rng, 1.0)
    assert st.phase == Phase.MERGE and st.workers[0] == ["a"]
    _report_pg(st, "a", now)  # its pseudo-gradient is the stage's update: accepted, set frozen
    assert st.frozen[0] == ["a"]
    view = metrics(st, now)
    assert view.miners[0].standing == "probation" and view.unpaid == ["a"]
    dash = dashboard_state(view, st.run, [], _CONSOLE, None, now)
    assert dash["stages"][0]["probation"] == ["a"]
    assert any("stage 0 trains on replicas that failed an audit" in a for a in dash["alerts"])


def test_a_failed_replica_sits_out_while_a_live_peer_in_good_standing_serves_its_stage():
    st, rng = make(1, samples_per_round=8, total_rounds=4, quarantine_rounds=3), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    quarantine.record_verdict(st, "val", 0, "b", False, "audit failed")
    assert st.quarantined(st.miners["b"], 1.0) and lease(st, "b", 1.0, rng)[0] == "wait"
    assert metrics(st, 1.0).miners[1].standing == "quarantined"
    # the peer falls silent past the health timeout: b is the stage's last live replica again
    st.miners["b"].last_seen = 40.0
    assert not st.quarantined(st.miners["b"], 40.0)
    assert lease(st, "b", 40.0, rng)[0] == "work" and st.unpaid == ["b"]
    # both failed: neither sits out (the stage is never emptied by verdicts)
    quarantine.record_verdict(st, "val", 0, "a", False, "audit failed")
    assert not st.quarantined(st.miners["a"], 1.0) and not st.quarantined(st.miners["b"], 1.0)


def test_a_round_that_completes_no_sample_does_not_count_and_is_reported():
    st, rng = make(2, samples_per_round=2, total_rounds=1, max_attempts=1), random.Random(0)
    for hk in "ab":
        state.register(st, hk, 0.0, rng)
    for _ in range(2):  # stage 0 cannot compute its hops (say, out of memory): each one fails
        _, hops, _ = lease(st, "a", 1.0, rng, 2)
        for h in hops:
            state.retry_hop(st, h, 1.0, rng, "worker error: CUDA out of memory")
    # nobody did work, so no merge to wait for: the round ended at once, and the run is not done
    # although total_rounds=1 rounds have passed: none of them trained
    assert st.empty_rounds == 1 and st.phase == Phase.TRAIN and st.round == 1
    assert st.last_empty == {"round": 0, "abandoned": 2,
                             "reasons": {"worker error: CUDA out of memory after 1 attempts": 2}}
    view = metrics(st, 2.0)
    assert (view.empty_rounds, view.last_empty_round) == (1, 0)
    assert any("trained nothing" in a and "out of memory" in a
               for a in dashboard_state(view, st.run, [], _CONSOLE, None, 2.0)["alerts"])
    drive(st, "ab", rng, 2.0)  # round 1 trains; the end of its merge is the run's end
    assert st.phase == Phase.MERGE and st.r_completed == 2 and st.empty_rounds == 1
    round_start.start_round(st, 2, 3.0)
    assert st.phase == Phase.DONE


def test_quarantining_the_only_replica_of_a_stage_does_not_stop_the_run(tmp_path, s3_server):
    _, keys = make_chain(tmp_path / "chain.db", miners=2, validators=1, prefix="qp")
    cfg = tiny_run_config(total_rounds=3, samples_per_round=4, quarantine_rounds=10)
    b = start_bridge(tmp_path, cfg, tmp_path / "chain.db", s3_server)
    stop = threading.Event()
    validator = BridgeClient(keys["validators"][0], b.url, b.hotkey)
    try:
        ws = [FakeWorker(k, b.url, b.hotkey, stop) for k in keys["miners"]]
        for w in ws:
            w.start()
        def phase_is(phase: str) -> bool:
            assert not any(w.error for w in ws), [w.error for w in ws]
            return validator.metrics().phase == phase

        wait_for(lambda: phase_is("train"), 120, "round 0 to start training")
        stage1 = next(mm.hotkey for mm in validator.metrics().miners if mm.stage == 1)
        ack = validator.verdicts(VerdictReport(round=0, verdicts=[
            Verdict(hotkey=stage1, passed=False, reason="drill: the only replica of stage 1 failed")]))
        assert ack.quarantined == {stage1: 11}
        m = validator.metrics()
        assert next(mm.standing for mm in m.miners if mm.hotkey == stage1) == "probation"
        dash = httpx.get(b.url + route("dashboard").path, timeout=10).json()
        assert dash["stages"][1]["probation"] == [stage1] and dash["alerts"]
        wait_for(lambda: phase_is("done"), 120, "the run to finish", every=0.2)
        m = validator.metrics()
        assert m.completed_total == 12 and m.empty_rounds == 0
        assert all(s.published_round == 3 for s in m.stages)  # stage 1 merged every round
        for r in range(3):  # validators see it worked unpaid in every round
            assert validator.hoplog(r).unpaid == [stage1]
    finally:
        stop.set()
        b.stop()
