"""The dashboard in a real headless Chromium during a short localnet run: the numbers on the page
match the bridge's state, mid-run and at the end (with the validator's published weights, which
match the chain, and its held-out loss curve), and a screenshot is saved (set RESBM_SCREENSHOT_DIR
to keep it, e.g. docs/). And on a scripted bridge, a healthy and an unhealthy miner read in the
colours and counts their labels promise."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from protocol.bridge_client import BridgeClient
from protocol.routes import route
from scripts import localnet
from scripts.localnet_cluster import Cluster
from tests.browser import Browser, BrowserMissing, find_chromium
from tests.harness.waiting import wait_for
from tests.servers import code_bytes, make_chain, start_bridge, tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROUNDS = 3
PAGE_ROWS = """Array.from(document.querySelectorAll('#miners tbody tr')).map(tr => ({
  ...Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field, td.textContent])),
  colour: Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field, getComputedStyle(td).color])),
  status: tr.querySelector('[data-field=status]').dataset.status, hotkey: tr.dataset.hotkey}))"""
STAGE_ROWS = """Array.from(document.querySelectorAll('#stages tbody tr')).map(tr => ({
  ...Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field, td.textContent])),
  colour: Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field, getComputedStyle(td).color]))}))"""
GREEN, RED, AMBER = "rgb(21, 128, 61)", "rgb(185, 28, 28)", "rgb(180, 83, 9)"  # .ok, .bad, .warn
HEADER = """({round: $('round').textContent, phase: $('phase').textContent,
  completed: $('samples-completed').textContent, abandoned: $('samples-abandoned').textContent,
  moved: $('bytes-moved').dataset.value, at: document.body.dataset.generatedAt,
  progress: $('progress-completed').textContent, points: $('loss-chart').dataset.points,
  valPoints: $('loss-chart').dataset.valPoints, valLoss: $('val-loss').textContent,
  valLine: !!document.querySelector('#loss-chart polyline[data-series=val_curve]')})"""


def _page(b: Browser) -> dict:
    return {"head": b.eval(HEADER.replace("$(", "document.getElementById(")), "rows": b.eval(PAGE_ROWS),
            "stages": b.eval(STAGE_ROWS)}


def _snapshot_pair(b: Browser, url: str) -> tuple[dict, dict]:
    """The page and the JSON snapshot it rendered (same `generated_at`)."""
    for _ in range(60):
        j = httpx.get(url + route("dashboard").path).json()
        p = _page(b)
        if p["head"]["at"] == str(j["generated_at"]):
            return p, j
        time.sleep(0.25)
    raise AssertionError("the page never showed the bridge's current snapshot")


def _check(p: dict, j: dict) -> None:
    h = p["head"]
    assert (h["round"], h["phase"]) == (str(j["round"]), j["phase"])
    assert (h["completed"], h["abandoned"]) == (str(j["samples"]["completed"]), str(j["samples"]["abandoned"]))
    assert h["progress"] == str(j["progress"]["completed"]) and h["moved"] == str(j["bytes"]["moved"])
    assert h["points"] == str(len(j["loss_curve"])) and h["valPoints"] == str(len(j["val_curve"]))
    assert h["valLoss"] == (f"{j['val_curve'][-1]['loss']:.4f}" if j["val_curve"] else "-")
    assert [(s["online"], s["quarantined"]) for s in p["stages"]] == [
        (str(s["online"]), str(s["quarantined"])) for s in j["stages"]]
    rows = {r["hotkey"]: r for r in p["rows"]}
    assert set(rows) == {m["hotkey"] for m in j["miners"]}
    for m in j["miners"]:
        r = rows[m["hotkey"]]
        assert (r["hops"], r["stage"]) == (str(m["hops"]), str(m["stage"]))
        assert r["weight"] == ("-" if m["weight"] is None else f"{m['weight']:.4f}")
        assert r["audits"] == f"{m['audits_passed']} / {m['audits_failed']}"
        assert r["status"] == m["status"] and r["health"] == f"{m['health']:.2f}"
        assert r["colour"]["health"] == {"ok": GREEN, "bad": RED, "warn": AMBER}[m["health_class"]]


def test_dashboard_in_a_real_browser_during_a_localnet_run(tmp_path):
    try:
        find_chromium()
    except BrowserMissing as exc:
        pytest.fail(str(exc))  # CI installs it (.ci/run): absent means a broken setup, not a skip
    # the validator tests' model size (audit tolerances were measured on it): fast on shared cores
    args = localnet.build_parser().parse_args([
        "--stages", "2", "--rounds", str(ROUNDS), "--inner-steps", "2", "--d-model", "32", "--layers", "2",
        "--heads", "2", "--seq-len", "16", "--ratio", "8", "--batch-size", "2"])
    cluster = Cluster(tmp_path / "net", localnet.run_config_from_args(args), 1)
    try:
        cluster.start()
        client = BridgeClient(cluster.owner_keypair, cluster.bridge_url, None)
        with Browser(tmp_path / "chromium") as b:
            b.open(cluster.bridge_url + "/?refresh=500")
            b.wait_for("document.body.dataset.generatedAt")
            mid = False
            end = time.monotonic() + 240
            while time.monotonic() < end:
                p, j = _snapshot_pair(b, cluster.bridge_url)
                _check(p, j)
                if j["phase"] in ("train", "merge"):
                    mid = True  # honest miners at work: online and healthy, in green
                    assert all(r["colour"]["status"] == r["colour"]["health"] == GREEN
                               for r in p["rows"] if r["status"] == "online"), p["rows"]
                    assert all(s["colour"]["quarantined"] != RED for s in p["stages"]), p["stages"]
                if j["phase"] == "done":
                    break
            assert mid, "never saw the run in progress"
            assert j["phase"] == "done", "the run did not finish"
            localnet._wait_for_weights(cluster, timeout=120.0)
            wait_for(lambda: len(httpx.get(cluster.bridge_url + route("dashboard").path).json()["val_curve"]) >= ROUNDS,
                     120, "the validator's held-out loss of the last round", every=1.0)
            caught_up = time.time()  # the last weights are published by now; let the page catch up
            b.wait_for(f"Number(document.body.dataset.generatedAt) > {caught_up}", timeout=30)
            p, j = _snapshot_pair(b, cluster.bridge_url)
            _check(p, j)
            m = client.get(route("metrics").path)
            assert p["head"]["completed"] == str(m["completed_total"]) == str(ROUNDS * j["progress"]["total"])
            rows = {r["hotkey"]: r for r in p["rows"]}
            assert {hk: r["hops"] for hk, r in rows.items()} == {x["hotkey"]: str(x["hops_done"]) for x in m["miners"]}
            mg = cluster.chain.metagraph()
            vhk = cluster.hotkeys[cluster.validator_procs[0].name]
            chain_w = cluster.chain.weights_of(vhk)
            assert any(float(r["weight"]) > 0 for r in rows.values()), rows
            for hk, r in rows.items():
                assert float(r["weight"]) == pytest.approx(chain_w.get(mg.uid_of(hk), 0.0), abs=1e-4), (rows, chain_w)
                assert sum(map(int, r["audits"].split(" / "))) > 0, "every miner was audited (fraction 1.0)"
            assert int(p["head"]["points"]) == ROUNDS
            # the validator's held-out loss of every round's model is drawn next to the training loss
            assert int(p["head"]["valPoints"]) == ROUNDS and p["head"]["valLine"], p["head"]
            assert [v["validators"] for v in j["val_curve"]] == [1] * ROUNDS
            shot = tmp_path / "dashboard.png"
            b.screenshot(shot)
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("RESBM_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["RESBM_SCREENSHOT_DIR"]) / "dashboard.png")
    finally:
        cluster.stop()


def test_a_healthy_and_an_unhealthy_miner_read_in_the_colours_and_counts_their_labels_say(tmp_path, s3_server):
    try:
        find_chromium()
    except BrowserMissing as exc:
        pytest.fail(str(exc))
    cfg = tiny_run_config(lease_seconds=1.0, model={"seq_len": 8})
    code = code_bytes(cfg)
    lease = {"max_hops": 1, "fwd_out_bytes": code, "bwd_out_bytes": code}
    _, keys = make_chain(tmp_path / "chain.db", miners=3, validators=1)
    b = start_bridge(tmp_path / "bridge", cfg, tmp_path / "chain.db", s3_server)
    try:
        sick, well, peer = (BridgeClient(k, b.url, b.hotkey, max_tries=1) for k in keys["miners"])
        assert sick.post(route("register").path, {})["stage"] == 0
        assert well.post(route("register").path, {})["stage"] == 1
        # a live peer in good standing on stage 0, so a failed verdict quarantines `sick` (the only
        # replica of a stage would train on, on probation: tests/test_quarantine_probation.py)
        assert peer.post(route("register").path, {})["stage"] == 0
        assert sick.post(route("lease").path, lease)["hops"]  # leased and never done: it expires
        time.sleep(1.5)
        well.post(route("lease").path, lease)  # any transition expires the overdue lease
        val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
        val.post(route("verdicts").path, {"round": 0, "verdicts": [
            {"hotkey": keys["miners"][0].ss58_address, "passed": False, "reason": "replay mismatch"}]})
        with Browser(tmp_path / "chromium") as br:
            br.open(b.url + "/?refresh=500")
            br.wait_for("document.querySelectorAll('#miners tbody tr').length === 3")
            rows = {r["hotkey"]: r for r in br.eval(PAGE_ROWS)}
            stages = br.eval(STAGE_ROWS)
        bad, good = rows[keys["miners"][0].ss58_address], rows[keys["miners"][1].ss58_address]
        assert (good["status"], good["health"]) == ("online", "1.00")
        assert good["colour"]["status"] == good["colour"]["health"] == GREEN  # healthy reads green, not red
        assert bad["status"] == "quarantined" and bad["colour"]["status"] == RED
        assert bad["health"] == "0.50" and bad["colour"]["health"] == AMBER  # halved by its expired lease
        assert [(s["replicas"], s["online"], s["quarantined"]) for s in stages] == [("2", "1", "1"), ("1", "1", "0")]
        assert stages[0]["colour"]["online"] == AMBER and stages[0]["colour"]["quarantined"] == RED
        assert stages[1]["colour"]["online"] == GREEN
    finally:
        b.stop()
