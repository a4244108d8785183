"""The owner's console on a real bridge: `/metrics` read by Prometheus' own text parser, the
dashboard JSON against the signed metrics, and the signed validator-report route."""
from __future__ import annotations

import hashlib
import os
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.console_store import ConsoleStore
from bridge.dashboard_history import busy_seconds, summarise_round
from bridge.records import Hop
from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.console import ValidatorReport
from protocol.routes import route
from tests.servers import code_bytes, make_chain, start_bridge, tiny_run_config

CFG = tiny_run_config(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 8,
                             "n_stages": 2, "bottleneck_dim": 4})
CODE = code_bytes(CFG)  # every hop output is exactly one code of this run
LEASE = {"max_hops": 1, "fwd_out_bytes": CODE, "bwd_out_bytes": CODE}


@pytest.fixture(scope="module")
def env(tmp_path_factory, s3_server):
    d = tmp_path_factory.mktemp("console")
    _, keys = make_chain(d / "chain.db", miners=2, validators=1)
    b = start_bridge(d, CFG, d / "chain.db", s3_server)
    miners = [BridgeClient(k, b.url, b.hotkey, max_tries=1) for k in keys["miners"]]
    for c in miners:
        c.post(route("register").path, {})
    for _ in range(2):  # two verified forward hops on stage 0
        hop = miners[0].post(route("lease").path, LEASE)["hops"][0]
        data = os.urandom(CODE)
        assert httpx.put(hop["output"]["put_url"], content=data).status_code == 200
        miners[0].post(route("hop_done").path, {"hop_id": hop["hop_id"], "size": CODE,
                                         "sha256": hashlib.sha256(data).hexdigest()})
    val = BridgeClient(keys["validators"][0], b.url, b.hotkey, max_tries=1)
    yield b, keys, miners, val
    b.stop()


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    text = httpx.get(url + route("prometheus").path).text
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_prometheus_scrape_matches_the_signed_metrics(env):
    b, keys, miners, val = env
    m = val.get(route("metrics").path)
    prom = _scrape(b.url)
    hk0 = keys["miners"][0].ss58_address
    assert prom["resbm_bridge_stage_hops_total"][(("stage", "0"),)] == m["stages"][0]["hops_done"] == 2
    assert prom["resbm_bridge_stage_bytes_total"][(("stage", "0"),)] == m["stages"][0]["bytes_moved"]
    assert prom["resbm_bridge_miner_hops_total"][(("hotkey", hk0), ("stage", "0"))] == 2
    assert prom["resbm_bridge_round"][(("run_id", "test-run"),)] == m["round"]
    assert prom["resbm_bridge_phase"][(("phase", m["phase"]),)] == 1.0
    assert prom["resbm_bridge_hop_seconds_count"][(("kind", "fwd"), ("stage", "0"))] == 2
    assert prom["resbm_bridge_hop_output_bytes_sum"][(("kind", "fwd"), ("stage", "0"))] == 2 * CODE
    assert prom["resbm_bridge_stage_merges_total"][(("stage", "0"),)] == 0  # nothing merged yet
    replicas = prom["resbm_bridge_stage_replicas"]
    assert sum(replicas.values()) == sum(s["replicas"] for s in m["stages"]) == 2


def test_dashboard_page_and_json_are_public_and_match(env):
    b, keys, _, val = env
    page = httpx.get(b.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="miners"' in page.text and "v1/dashboard" in page.text
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text), "the page must work offline (no CDN)"
    d = httpx.get(b.url + route("dashboard").path).json()
    m = val.get(route("metrics").path)
    assert (d["run_id"], d["round"], d["phase"]) == (m["run_id"], m["round"], m["phase"])
    assert {x["hotkey"]: x["hops"] for x in d["miners"]} == {x["hotkey"]: x["hops_done"] for x in m["miners"]}
    assert d["bytes"]["moved"] == sum(s["bytes_moved"] for s in m["stages"])
    assert d["bytes"]["uncompressed"] == 2 * 1 * 8 * 32 * 2  # 2 hop objects of B x T x d bf16
    assert d["incentives"]["burn_share"] == 0.1


def test_validator_report_is_signed_stored_and_shown(env):
    b, keys, miners, val = env
    hk0, hk1 = keys["miners"][0].ss58_address, keys["miners"][1].ss58_address
    report = ValidatorReport(round=0, window=1, scores={hk0: 4.0, hk1: 0.0},
                             verdicts=[{"round": 0, "hotkey": hk0, "passed": True},
                                       {"round": 0, "hotkey": hk1, "passed": False, "reason": "bad output"}],
                             weights={hk0: 0.9, keys["owner"][0].ss58_address: 0.1})
    with pytest.raises(BridgeError) as e:
        miners[0].post(route("validator_report").path, report)  # no validator permit
    assert e.value.status == 403
    with pytest.raises(BridgeError) as e:
        val.post(route("validator_report").path, {"round": 0, "window": 0, "scores": {hk0: float("inf")}})
    assert e.value.status == 400
    assert httpx.post(b.url + route("validator_report").path, json=report.model_dump()).status_code == 401
    val.post(route("validator_report").path, report)
    time.sleep(1.1)  # the JSON is cached for a second
    d = httpx.get(b.url + route("dashboard").path).json()
    rows = {x["hotkey"]: x for x in d["miners"]}
    assert rows[hk0]["weight"] == 0.9 and rows[hk0]["score"] == 4.0 and rows[hk0]["audits_passed"] == 1
    assert rows[hk1]["audits_failed"] == 1 and rows[hk1]["last_audit"]["reason"] == "bad output"
    assert d["owner"]["weight"] == 0.1
    prom = _scrape(b.url)
    assert prom["resbm_bridge_audits_total"][(("hotkey", hk1), ("verdict", "fail"))] == 1
    assert prom["resbm_bridge_validator_reports_total"][()] == 1


def test_console_store_survives_restart_and_corruption(tmp_path):
    path = str(tmp_path / "console.json")
    s = ConsoleStore(path)
    s.add("v", ValidatorReport(round=3, window=2, verdicts=[{"round": 3, "hotkey": "m", "passed": False}]), 1.0)
    again = ConsoleStore(path).snapshot()
    assert again["audits"]["m"]["failed"] == 1 and again["validators"]["v"]["round"] == 3
    (tmp_path / "console.json").write_text("{not json")
    assert ConsoleStore(path).snapshot()["audits"] == {}
    assert list(tmp_path.glob("console.json.corrupt-*")), "the unreadable file was not kept aside"


def test_round_summary_counts_overlapping_leases_once():
    assert busy_seconds([(0, 2), (1, 3), (5, 6), (4, 4)]) == 4.0
    hops = [Hop("a", 0, 0, 0, "fwd", leased_to="x", leased_at=0, done_at=2),
            Hop("b", 1, 0, 1, "fwdbwd", leased_to="y", leased_at=1, done_at=4, loss=2.0),
            Hop("c", 2, 0, 1, "fwdbwd", leased_to="y", leased_at=2, done_at=3, loss=4.0)]
    s = summarise_round(0, hops)
    assert s["loss"] == 3.0 and s["seconds"] == 4.0
    assert s["miners"]["x"] == {"hops": 1, "compute_fraction": 0.5}
    assert s["miners"]["y"] == {"hops": 2, "compute_fraction": 0.75}


def test_nothing_to_export_or_evaluate_before_the_first_merge(env):
    b, keys, miners, val = env
    r = httpx.get(b.url + route("model").path)
    assert r.status_code == 409 and r.json()["error"] == "not_published" and "round 0" in r.json()["message"]
    report = {"round": 0, "loss": 5.0, "tokens": 8}
    with pytest.raises(BridgeError) as e:
        val.post(route("validation_loss").path, report)
    assert e.value.status == 409  # round 0 has no published model yet
    with pytest.raises(BridgeError) as e:
        miners[0].post(route("validation_loss").path, report)
    assert e.value.status == 403  # a miner never reports a loss that is shown
    assert httpx.post(b.url + route("validation_loss").path, json=report).status_code == 401
    for bad in ({"round": 0, "loss": float("inf"), "tokens": 8}, {"round": 0, "loss": -1.0, "tokens": 8},
                {"round": 0, "loss": 5.0, "tokens": 0}, {"round": -1, "loss": 5.0, "tokens": 8}):
        with pytest.raises(BridgeError) as e:
            val.post(route("validation_loss").path, bad)
        assert e.value.status == 400, bad
    d = httpx.get(b.url + route("dashboard").path).json()
    assert d["val_curve"] == [] and d["val_tokens"] == CFG.get("val_tokens", 16384)
    assert "resbm_bridge_validation_loss" not in _scrape(b.url)  # absent, not a perfect 0


def test_the_validation_figure_is_the_median_of_validators_and_survives_a_restart(tmp_path):
    from protocol.console import ValidationLossReport
    path = str(tmp_path / "console.json")
    s = ConsoleStore(path)
    for v, loss in (("v1", 2.0), ("v2", 2.1), ("liar", 50.0)):
        s.add_validation(v, ValidationLossReport(round=4, loss=loss, tokens=64), 1.0)
    assert s.validation_at(4) == {"loss": 2.1, "validators": 3, "tokens": 64}  # one liar moves nothing
    s.add_validation("liar", ValidationLossReport(round=4, loss=0.001, tokens=64), 2.0)  # a repeat replaces
    assert s.validation_at(4)["loss"] == 2.0 and s.validation_at(4)["validators"] == 3
    assert s.validation_at(5) is None
    assert ConsoleStore(path).validation_at(4) == s.validation_at(4)


def test_statuses_colours_and_stage_counts_mean_what_their_labels_say():
    from bridge.dashboard import dashboard_state
    from protocol.messages import Metrics, RunConfig
    from protocol.status_messages import MinerMetrics, StageMetrics
    now, hk = 1000.0, ["a", "b", "c", "d"]

    def miner(h, stage, health):
        return MinerMetrics(hotkey=h, stage=stage, healthy=True, health=health, throughput=1.0, hops_done=3,
                            lease_expiries=0, failures=0, bytes_moved=0, inner_step=0, merge_disagreements=0)
    m = Metrics(run_id="r", round=2, phase="train", samples_total=8, samples_completed=1, samples_abandoned=0,
                abandoned_total=0, completed_total=9, stages=[
                    StageMetrics(stage=s, replicas=2, healthy_replicas=0, hops_done=1, throughput=1.0,
                                 lease_expiries=0, reroutes=0, bytes_moved=1, published_round=2) for s in (0, 1)],
                miners=[miner("a", 0, 1.0), miner("b", 0, 0.25), miner("c", 1, 0.6), miner("d", 1, 1.0)])
    presence = {"a": {"active": True, "last_seen": now - 500, "quarantined_until": None},  # heard via a sync call
                "b": {"active": True, "last_seen": now - 1, "quarantined_until": 7},
                "c": {"active": True, "last_seen": now - 300, "quarantined_until": None},
                "d": {"active": False, "last_seen": now - 1, "quarantined_until": None}}
    console = {"validators": {}, "audits": {}, "verdicts": [], "validation": {}}
    d = dashboard_state(m, RunConfig(**CFG), [], console, None, now, presence, {"a": now - 3}, 120.0)
    rows = {x["hotkey"]: x for x in d["miners"]}
    assert [rows[h]["status"] for h in hk] == ["online", "quarantined", "offline", "left"]
    assert rows["b"]["status_detail"] == "until round 7" and rows["c"]["status_detail"] == "silent 300s"
    assert [rows[h]["health_class"] for h in hk] == ["ok", "bad", "warn", "ok"]
    assert [(s["online"], s["quarantined"], s["state_after_round"]) for s in d["stages"]] == [(1, 1, 1), (0, 0, 1)]
