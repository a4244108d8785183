"""A miner recovers from a lost `done` report: the bridge re-leases the hop when its lease ends,
the miner's accumulated samples then differ from the bridge's count, and the miner steps with the
bridge's count instead of retrying a refused step until the round times out."""
from __future__ import annotations

import httpx
import pytest

from neurons.miner_loop import Miner
from tests.harness.miner_subnet import MinerThread, run_config, set_threads, start_subnet

pytestmark = pytest.mark.timeout(150)


class LosesOneReport(Miner):
    """An honest miner whose first backward `done` report never reaches the bridge (a lost packet)."""

    lost: list[str] = []

    def _report_done(self, hop, done):
        if hop.kind != "fwd" and not self.lost:
            self.lost.append(hop.hop_id)
            raise httpx.ConnectError("drill: report lost on the way")
        super()._report_done(hop, done)


def test_a_lost_done_report_costs_one_lease_not_the_round(tmp_path):
    set_threads()
    cfg = run_config(run_id="lost-report", total_rounds=2, lease_seconds=3.0)
    net = start_subnet(tmp_path, cfg, miners=2)
    try:
        m0 = MinerThread(net, net.keys["miners"][0])
        m1 = MinerThread(net, net.keys["miners"][1], make=LosesOneReport)
        m0.start(), m1.start()
        m0.join(120), m1.join(120)
        metrics = net.metrics()
    finally:
        net.stop()
    assert len(LosesOneReport.lost) == 1
    # the lost hop was re-leased and done again: nothing abandoned, every round merged in time
    assert metrics["completed_total"] == cfg["total_rounds"] * cfg["samples_per_round"], metrics
    assert metrics["abandoned_total"] == 0, metrics
    assert m1.miner.state.round == m0.miner.state.round == cfg["total_rounds"]
    assert m1.miner.status.step_mismatches >= 1, "the lost report left no mismatch to recover from"
    # the late sample may get a step of its own; none was applied twice
    assert m1.miner.status.steps >= cfg["total_rounds"] * cfg["inner_steps_per_round"]
    assert m1.miner.status.duplicate_steps == 0
