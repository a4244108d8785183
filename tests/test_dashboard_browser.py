"""The dashboard in a real headless Chromium during a short localnet run: the numbers on the page
match the bridge's state, mid-run and at the end (with the validator's published weights, which
match the chain), and a screenshot is saved (set RESBM_SCREENSHOT_DIR to keep it, e.g. docs/)."""
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

ROUNDS = 3
PAGE_ROWS = """Array.from(document.querySelectorAll('#miners tbody tr')).map(tr => ({
  ...Object.fromEntries(Array.from(tr.cells).map(td => [td.dataset.field, td.textContent])),
  hotkey: tr.dataset.hotkey}))"""
HEADER = """({round: $('round').textContent, phase: $('phase').textContent,
  completed: $('samples-completed').textContent, abandoned: $('samples-abandoned').textContent,
  moved: $('bytes-moved').dataset.value, at: document.body.dataset.generatedAt,
  progress: $('progress-completed').textContent, points: $('loss-chart').dataset.points})"""


def _page(b: Browser) -> dict:
    return {"head": b.eval(HEADER.replace("$(", "document.getElementById(")), "rows": b.eval(PAGE_ROWS)}


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
    assert h["points"] == str(len(j["loss_curve"]))
    rows = {r["hotkey"]: r for r in p["rows"]}
    assert set(rows) == {m["hotkey"] for m in j["miners"]}
    for m in j["miners"]:
        r = rows[m["hotkey"]]
        assert (r["hops"], r["stage"]) == (str(m["hops"]), str(m["stage"]))
        assert r["weight"] == ("-" if m["weight"] is None else f"{m['weight']:.4f}")
        assert r["audits"] == f"{m['audits_passed']} / {m['audits_failed']}"


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
                mid = mid or j["phase"] in ("train", "merge")
                if j["phase"] == "done":
                    break
            assert mid, "never saw the run in progress"
            assert j["phase"] == "done", "the run did not finish"
            localnet._wait_for_weights(cluster, timeout=120.0)
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
            shot = tmp_path / "dashboard.png"
            b.screenshot(shot)
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            if os.environ.get("RESBM_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["RESBM_SCREENSHOT_DIR"]) / "dashboard.png")
    finally:
        cluster.stop()
