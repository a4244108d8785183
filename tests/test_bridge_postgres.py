"""The PostgreSQL backend's cross-process guarantees, in one process: two bridge services (each
as a separate process would be: its own pool, live state and nonce store) over one database in
the tests' throwaway cluster; the wake-up channel; failing over between bridge URLs."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from bridge import state
from bridge.db_postgres import PostgresDatabase
from bridge.longpoll import Waiters
from bridge.pg_nonces import PgNonceStore
from bridge.pg_notify import WakeListener
from bridge.records import TransitionError, Tunables
from bridge.service import BridgeService
from protocol.auth import AuthFailed
from protocol.client import BridgeUrls, split_urls
from protocol.lifecycle import HopStatus, Phase
from protocol.messages import RunConfig

RUN = RunConfig(run_id="pg", model={}, n_stages=2, batch_size=1, micro_batches_per_step=4,
                inner_steps_per_round=2, samples_per_round=40, muon_lr=0.02, adamw_lr=0.003,
                total_rounds=2, data_seed=1, init_seed=2, lease_seconds=30.0, max_attempts=3,
                max_object_bytes=1000, merge_timeout_seconds=50.0)
TUN = Tunables(health_timeout=300.0, backoff_seconds=1.0)
SHA = "ab" * 32


def service(url, nonces=False, **kw):
    db = PostgresDatabase(url, pool_size=2)
    store = PgNonceStore(db.pool, **kw) if nonces else None
    return BridgeService(RUN, db, None, TUN, nonces=store)


def test_two_services_share_one_state_and_lease_each_hop_once(pg_url):
    a, b = service(pg_url), service(pg_url)
    for i, hk in enumerate("wxyz"):  # registrations made at either process hold at both
        (a if i % 2 else b).apply(state.register, hk)
    assert a.read(lambda st: sorted(st.miners)) == b.read(lambda st: sorted(st.miners)) \
        == list("wxyz")
    assert a.read(lambda st: st.phase) == Phase.TRAIN
    leased: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def step(st, now, rng, hk):
        m = st.miners[hk]
        state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)

    def miner(hk):  # a worker whose requests alternate between the two processes
        try:
            for i in range(400):
                svc = (a, b)[i % 2]
                if svc.read(lambda st: st.phase) != Phase.TRAIN:
                    return
                action, hops, _ = svc.apply(state.lease, hk, 2, 100, 100)
                with lock:
                    leased.extend(h.hop_id for h in hops)
                for h in hops:
                    svc.apply(state.complete, hk, h.hop_id, SHA if h.out_key else None,
                              h.out_size, 1.0)
                if action == "step":
                    (b, a)[i % 2].apply(lambda st, now, rng: step(st, now, rng, hk))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=miner, args=(hk,)) for hk in "wxyz"]  # all at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(leased) == len(set(leased)) and len(leased) >= 3 * RUN.samples_per_round
    st_a, st_b = a.read(lambda st: st), b.read(lambda st: st)
    assert st_a.phase == st_b.phase == Phase.MERGE  # the round closed once, seen by both
    assert st_a.r_completed == st_b.r_completed == RUN.samples_per_round
    done = [h for h in st_b.hops.values() if h.status == HopStatus.DONE]
    assert len(done) == 3 * RUN.samples_per_round
    assert b.db.version == a.db.version > 100  # one version counter for every commit


def test_a_transition_at_one_process_sees_what_the_other_committed(pg_url):
    a, b = service(pg_url), service(pg_url)
    a.apply(state.register, "p")
    a.apply(state.register, "q")
    _, hops, _ = b.apply(state.lease, "p", 1, 100, 100)  # b never saw p register
    with pytest.raises(TransitionError) as e:  # a must see b's lease: p's hop is not q's
        a.apply(state.complete, "q", hops[0].hop_id, SHA, 100, 1.0)
    assert e.value.code == "not_yours"
    a.apply(state.complete, "p", hops[0].hop_id, SHA, 100, 1.0)
    with pytest.raises(TransitionError) as e:  # applied once, whichever process is asked
        b.apply(state.complete, "p", hops[0].hop_id, SHA, 100, 1.0)
    assert e.value.code == "not_leased"


def test_a_nonce_is_accepted_once_whichever_process_sees_it(pg_url):
    a, b = service(pg_url, nonces=True), service(pg_url, nonces=True)
    n = time.time_ns()  # nonces are signing times: older ones are stale (and pruned)
    assert a.nonces.check_and_store("hk", n) and b.nonces.check_and_store("hk", n)
    assert not a.nonces.check_and_store("hk", n)  # the same process: refused at once
    seq_a, seq_b = a.nonces.stored, b.nonces.stored
    a.apply(lambda st, now, rng: None)
    b.apply(lambda st, now, rng: None)
    assert a.nonces.verdict(seq_a) is None
    refusal = b.nonces.verdict(seq_b)
    assert isinstance(refusal, AuthFailed) and refusal.reason == "replayed"
    assert b.nonces.durable >= seq_b and b.nonces.refused == 1


def test_the_rate_limit_is_counted_over_every_process(pg_url):
    a = service(pg_url, nonces=True, rate=2.0, burst=4.0)
    b = service(pg_url, nonces=True, rate=2.0, burst=4.0)
    seqs = []
    for i in range(6):  # 3 requests at each process, each within its own local burst
        svc = (a, b)[i % 2]
        assert svc.nonces.check_and_store("flood", time.time_ns() + i)
        seqs.append((svc, svc.nonces.stored))
    a.apply(lambda st, now, rng: None)
    b.apply(lambda st, now, rng: None)
    verdicts = [svc.nonces.verdict(seq) for svc, seq in seqs]
    refused = [v for v in verdicts if v is not None]
    assert len(refused) == 2 and all(v.code == "rate_limited" for v in refused)
    assert a.nonces.check_and_store("calm", time.time_ns())  # other hotkeys are not affected
    a.apply(lambda st, now, rng: None)
    assert a.nonces.verdict(a.nonces.stored) is None


def test_a_refused_request_is_not_applied(pg_url):
    a, b = service(pg_url, nonces=True), service(pg_url, nonces=True)
    n = time.time_ns()
    assert a.nonces.check_and_store("hk", n) and b.nonces.check_and_store("hk", n)
    a.apply(lambda st, now, rng: None)  # a's request used the nonce first

    async def replayed_register():  # b runs a register under the replayed nonce
        from bridge.durable import _SLOT
        _SLOT.set({"seq": b.nonces.stored})
        return await b.apply_async(state.register, "intruder")
    with pytest.raises(AuthFailed):
        asyncio.run(replayed_register())
    assert "intruder" not in a.read(lambda st: st.miners)


def test_a_commit_wakes_long_polls_of_other_processes_only(pg_url):
    a, b = service(pg_url), service(pg_url)
    got: list = []
    listen = WakeListener(pg_url, a.db.channel, a.db.origin, lambda t, e, v: got.append((t, e, v)))
    listen.start()
    assert listen.ready.wait(10)
    try:
        b.apply(state.register, "m")
        a.apply(state.register, "n")  # the round starts at a: a's own NOTIFY, ignored by a
        _, hops, _ = b.apply(state.lease, "m", 1, 100, 100)
        b.apply(state.complete, "m", hops[0].hop_id, SHA, 100, 1.0)  # work for n, made at b
        end = time.monotonic() + 10
        while not got and time.monotonic() < end:
            time.sleep(0.05)
        time.sleep(0.3)  # anything else would have arrived by now
        assert len(got) == 1, got
        targets, everyone, version = got[0]
        assert targets == [("miner", "n")] and not everyone and version == b.db.version
    finally:
        listen.stop()


def test_a_waiter_does_not_park_after_a_wake_newer_than_its_answer():
    async def scenario():
        w = Waiters()
        w.wake([("stage", 1)], version=7)  # e.g. another process's NOTIFY, before we parked
        early = asyncio.ensure_future(w.wait("m", 1, 3600.0, since=6))
        await asyncio.sleep(0)  # one turn of the loop: a parked wait would still be pending
        assert early.done() and early.result() is True and "m" not in w._by_miner
        assert await w.wait("m", 1, 0.05, since=7) is False  # nothing newer: parks, times out
        assert await w.wait("m", 0, 0.05, since=6) is False  # another stage's work
    asyncio.run(scenario())


def test_bridge_urls_fail_over_and_back_off():
    now = [0.0]
    urls = BridgeUrls(split_urls("http://a:1/, http://b:2"), first=1.0, cap=4.0,
                      clock=lambda: now[0])
    assert urls.urls == ["http://a:1", "http://b:2"] and urls.pick() == 0
    urls.failed(0)
    assert urls.pick() == 1  # the dead one is skipped
    urls.failed(1)
    assert urls.all_down() and urls.pick() == 0  # both down: the one back first
    now[0] = 1.5
    urls.failed(0)  # second failure: two seconds now
    assert urls.pick() == 1
    urls.ok(1)
    assert urls.pick() == 1 and not urls.all_down()
    with pytest.raises(ValueError):
        split_urls(" , ")


def test_bridge_url_may_be_repeated_or_comma_separated(monkeypatch, tmp_path):
    from neurons.cli import NeuronSettings
    from protocol.settings import load_settings
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("RESBM_BRIDGE_URL", raising=False)
    s = load_settings(NeuronSettings, ["--bridge.url", "http://a:1", "--bridge.url", "http://b:2"])
    assert split_urls(s.bridge_url) == ["http://a:1", "http://b:2"]
    monkeypatch.setenv("RESBM_BRIDGE_URL", "http://c:3,http://d:4")
    assert split_urls(load_settings(NeuronSettings, []).bridge_url) == ["http://c:3", "http://d:4"]


def test_a_cluster_that_cannot_start_says_why_in_one_line(monkeypatch, tmp_path):
    from scripts.local_postgres import PostgresUnavailable, start_postgres
    monkeypatch.setenv("PG_BIN", str(tmp_path))  # no initdb there
    with pytest.raises(PostgresUnavailable) as e:
        start_postgres(tmp_path)
    assert "\n" not in str(e.value) and "apt-get install -y postgresql" in str(e.value)
