"""Miners as real `python neurons/miner.py` processes: SIGKILL mid-round and restart (the run goes
on, no sample lost, the miner rejoins and works again), and SIGTERM (clean exit 0 within seconds)."""
from __future__ import annotations

import json
import signal

import pytest

from tests.harness.miner_subnet import MinerProc, run_config, start_subnet, wait_for

pytestmark = pytest.mark.timeout(150)


def _miner_metrics(net, hotkey: str) -> dict:
    return next((m for m in net.metrics()["miners"] if m["hotkey"] == hotkey), {})


def _status(p: MinerProc) -> dict:
    try:
        return json.loads(p.status_file.read_text())
    except (OSError, ValueError):
        return {}


def test_killed_miner_is_replaced_and_rejoins_after_restart(tmp_path):
    cfg = run_config(run_id="kill", samples_per_round=8, total_rounds=1000, lease_seconds=4.0,
                     merge_timeout_seconds=8.0, max_attempts=6)
    net = start_subnet(tmp_path, cfg, miners=4, wallets=True, bridge_flags=("--health-timeout", "4"))
    try:
        procs = [MinerProc(net, i).start() for i in range(4)]
        wait_for(lambda: len(net.metrics()["miners"]) == 4, 60, "4 miners to register")
        m = wait_for(lambda: (lambda x: x if x["round"] == 0 and x["samples_completed"] >= 2 else None)(net.metrics()),
                     60, "round 0 to be under way", every=0.05)
        victim = procs[1]
        hotkey = victim.net.keys["miners"][1].ss58_address
        victim.kill()
        killed_in_round = m["round"]
        # the others carry the round to its end without the victim
        wait_for(lambda: net.metrics()["round"] > killed_in_round, 90, "the round to close without the killed miner")
        done_before = _miner_metrics(net, hotkey)["hops_done"]
        victim.status_file.unlink(missing_ok=True)
        victim.start()
        wait_for(lambda: _miner_metrics(net, hotkey).get("hops_done", 0) > done_before, 90,
                 "the restarted miner to do work again")
        for p in procs:
            p.signal(signal.SIGTERM)
        for p in procs:
            assert p.proc.wait(timeout=30) == 0, p.text()[-3000:]
        final = net.metrics()
    finally:
        net.stop()
    n = cfg["samples_per_round"]
    assert final["round"] > killed_in_round
    # every sample of every closed round completed (none abandoned, none lost)
    assert final["abandoned_total"] == 0, final["abandon_reasons"]
    assert final["completed_total"] == final["round"] * n + final["samples_completed"], final
    # the restarted process (fresh status file) served and did hops of its own (the first one may
    # have been killed before it logged that it was serving)
    assert _status(victim).get("hops_done", 0) > 0 and victim.text().count("serving stage") >= 1


def test_sigterm_finishes_and_reports_the_hops_in_hand_then_exits_zero(tmp_path):
    cfg = run_config(run_id="term", total_rounds=50, samples_per_round=8)
    net = start_subnet(tmp_path, cfg, miners=2, wallets=True)
    try:
        procs = [MinerProc(net, i).start() for i in range(2)]
        wait_for(lambda: net.metrics()["completed_total"] >= 4, 60, "the pipeline to be working")
        for p in procs:
            p.signal(signal.SIGTERM)
        codes = [p.proc.wait(timeout=60) for p in procs]  # a hang fails here; how fast is not asserted
        after = {m["hotkey"]: m for m in net.metrics()["miners"]}
    finally:
        net.stop()
    assert codes == [0, 0], [p.text()[-2000:] for p in procs]
    carried = total = 0
    for i, p in enumerate(procs):
        text = p.text()
        assert "finishing the hops in hand" in text and "stopped:" in text, text[-2000:]
        # every hop it finished was reported to the bridge (nothing left unreported)
        reported = after[net.keys["miners"][i].ss58_address]["hops_done"]
        assert _status(p)["hops_done"] == reported, (_status(p), reported)
        # the request counters tie every reported hop to its own requests: one `done` per hop
        # (retries add more), a lease on its path, its input GETs and output PUT as its kind needs
        req = _status(p)["requests"]
        kinds = req["hop_kinds"]
        assert sum(k["hops"] for k in kinds.values()) == reported, kinds
        for kind, k in kinds.items():
            r = k["requests"]
            assert r["hop_done"]["count"] >= k["hops"], (kind, r)
            leased = (r.get("lease", {}).get("count", 0) + r.get("lease_prefetch", {}).get("count", 0)
                      + r.get("lease_carried", {}).get("carried", 0))  # handed out in a done's or step's answer
            assert leased >= k["hops"], (kind, r)
            gets, puts = r.get("object_get", {}).get("count", 0), r.get("object_put", {}).get("count", 0)
            assert gets >= (k["hops"] if kind in ("bwd", "fwdbwd") else 0), (kind, r)
            assert puts >= (k["hops"] if kind in ("fwd", "fwdbwd") else 0), (kind, r)
        assert req["routes"]["hop_done"]["count"] >= reported and req["routes"]["step_done"]["count"] >= 1
        carried += sum(k["requests"].get("lease_carried", {}).get("carried", 0) for k in kinds.values())
        total += reported
    assert 0 < carried < total  # some hops came in the answer to a done or step report, not all
