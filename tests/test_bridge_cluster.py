"""Three bridge processes serve one run from one PostgreSQL database (the tests' throwaway
cluster), with real S3 and many fake workers (tests/harness/fake_worker.py) each failing over
between the three URLs. Over thousands of leases: no hop is leased twice, no signed request is
accepted twice whichever bridge sees it, no round transition happens twice, no sample is lost;
and one bridge is SIGKILLed mid-round while the others carry the run to its end."""
from __future__ import annotations

import json
import re
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from protocol.auth import sign_headers
from protocol.bridge_client import BridgeClient
from protocol.routes import route
from tests.harness.fake_worker import FakeWorker
from tests.harness.waiting import wait_for
from tests.servers import make_chain, start_bridges, tiny_run_config

N_BRIDGES, N_WORKERS, SAMPLES, ROUNDS = 3, 12, 340, 2  # 2,040 hop leases


def start_cluster(tmp_path, cfg, db_url, s3, n=N_BRIDGES):
    """`n` bridge processes on one database, each in its own folder (log, run YAML)."""
    return start_bridges([tmp_path / f"bridge{i}" for i in range(n)], cfg, tmp_path / "chain.db",
                         s3, db_url)


def rotated(urls, i):
    """Worker i talks to bridge i % n first, then fails over to the others in turn."""
    k = i % len(urls)
    return urls[k:] + urls[:k]


def replay_everywhere(kp, bridges):
    """Sign one request and send the very same bytes to every bridge at once: statuses."""
    path = route("run").path
    headers = sign_headers(kp, "GET", path, b"", bridges[0].hotkey)
    with ThreadPoolExecutor(len(bridges)) as pool:
        return list(pool.map(lambda b: httpx.get(b.url + path, headers=headers, timeout=30)
                             .status_code, bridges))


def done_hops_by_sample(db_url):
    """(sample, stage, kind) -> number of done hops, from the shared database."""
    done = Counter()
    with psycopg.connect(db_url) as con:
        for (data,) in con.execute("SELECT data FROM hops WHERE status = 'done'"):
            h = json.loads(data)
            done[(h["sample_id"], h["stage"], h["kind"])] += 1
    return done


def transitions_logged(bridges):
    """How often each round transition was logged, over every bridge's log."""
    seen = Counter()
    pats = {"start": r"round (\d+) started", "closed": r"round (\d+) closed",
            "frozen": r"round (\d+) stage (\d+) merge set frozen",
            "published": r"round (\d+) stage (\d+): state for round \d+ published",
            "done": r"run \S+ done after (\d+) rounds"}
    for b in bridges:
        text = b.log_path.read_text(errors="replace")
        for name, pat in pats.items():
            for m in re.finditer(pat, text):
                seen[(name, *m.groups())] += 1
    return seen


@pytest.mark.slow
@pytest.mark.timeout(600)  # three bridge start-ups (torch imports) side by side on a loaded box
def test_three_bridges_one_run_invariants_hold_and_a_sigkilled_bridge_loses_nothing(
        tmp_path, s3_server, pg_url):
    _, keys = make_chain(tmp_path / "chain.db", miners=N_WORKERS + 1, validators=0)
    cfg = tiny_run_config(total_rounds=ROUNDS, samples_per_round=SAMPLES, run_id="cluster",
                          micro_batches_per_step=8, inner_steps_per_round=4, lease_seconds=8.0,
                          max_attempts=6)
    bridges = start_cluster(tmp_path, cfg, pg_url, s3_server)
    urls = [b.url for b in bridges]
    stop = threading.Event()
    ws = [FakeWorker(kp, rotated(urls, i), bridges[0].hotkey, stop)
          for i, kp in enumerate(keys["miners"][:N_WORKERS])]
    prober = keys["miners"][N_WORKERS]  # registered on chain, never a miner: replays, metrics
    probe = BridgeClient(prober, urls[::-1], bridges[0].hotkey, max_tries=60, backoff_s=0.1,
                         max_backoff_s=0.5)
    replays, killed = [], None
    try:
        for w in ws:
            w.start()
        def step():
            """One look at the run: replay a signed request, kill a bridge mid-round once; the
            metrics when the run is done."""
            nonlocal killed
            for w in ws:
                assert w.error is None, repr(w.error)
            m = probe.metrics()
            if m.phase == "done":
                return m
            if len(replays) < 20:
                replays.append(replay_everywhere(prober, [b for b in bridges if b is not killed]))
            if killed is None and m.round == 0 and m.samples_completed >= SAMPLES // 4:
                killed = bridges[1]
                killed.kill()  # SIGKILL mid-round: no clean shutdown, its leases in flight
            return None
        m = wait_for(step, 150, "the run to finish", every=0.05)
        assert killed is not None, "the drill never killed a bridge mid-round"
        assert m.completed_total == SAMPLES * ROUNDS and m.abandoned_total == 0
        # every sample has exactly one done hop per (stage, kind): nothing lost, nothing twice
        done = done_hops_by_sample(pg_url)
        assert set(done.values()) == {1}
        assert Counter(k for (_, _, k) in done) == Counter(
            {"fwd": SAMPLES * ROUNDS, "fwdbwd": SAMPLES * ROUNDS, "bwd": SAMPLES * ROUNDS})
        # no hop was handed to two leases, across all bridges and workers
        leased = [h for w in ws for h in w.leased]
        assert len(leased) >= 3 * SAMPLES * ROUNDS and len(leased) == len(set(leased))
        # each signed request was accepted by exactly one bridge, the others refused it
        assert len(replays) >= 10
        for statuses in replays:
            assert sorted(statuses) == [200] + [401] * (len(statuses) - 1), statuses
        # every round transition happened once (logged by whichever bridge made it)
        seen = transitions_logged(bridges)
        want = {("start", str(r)) for r in range(ROUNDS)} | {("closed", str(r)) for r in range(ROUNDS)}
        want |= {(k, str(r), str(s)) for k in ("frozen", "published") for r in range(ROUNDS)
                 for s in range(2)} | {("done", str(ROUNDS))}
        assert set(seen) == want and set(seen.values()) == {1}, seen
        # the survivors did the work: each served requests after the kill
        assert all(w.hops > 0 for w in ws)
    finally:
        stop.set()
        for b in bridges:
            if b is not killed:
                b.stop()
