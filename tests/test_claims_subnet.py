"""Claim cheaters among real miners (bridge, rclone S3, LocalChain, in-process miners): a
producer that reports sha256s its uploads lack, and a consumer that claims every input is bad.
Each is charged; the honest miners are not; no sample is lost."""
from __future__ import annotations

from functools import partial

import pytest

from drills.cheaters import cheating_miner
from neurons.miner_loop import Miner
from tests.harness.miner_subnet import MinerThread, run_config, set_threads, start_subnet


@pytest.mark.timeout(150)
@pytest.mark.parametrize("kind,cheater,counter", [
    ("bad-sha", 2, "bad_outputs"),     # a second stage-0 replica: producer of activations
    ("false-claim", 3, "false_claims"),  # a second stage-1 replica: consumer of activations
])
def test_claim_cheater_is_charged_and_no_sample_is_lost(tmp_path, kind, cheater, counter):
    set_threads()
    cfg = run_config(run_id=f"claims-{kind}", samples_per_round=6, inner_steps_per_round=1,
                     total_rounds=1, micro_batches_per_step=2)
    net = start_subnet(tmp_path, cfg, miners=4)
    try:
        ms = [MinerThread(net, kp, make=partial(cheating_miner, kind) if i == cheater else Miner)
              for i, kp in enumerate(net.keys["miners"])]
        assert [m.assignment.stage for m in ms] == [0, 1, 0, 1]
        for m in ms:
            m.start()
        for m in ms:
            m.join(120)
        metrics = net.metrics()
    finally:
        net.stop()
    assert metrics["completed_total"] == 6 and metrics["abandoned_total"] == 0, metrics["abandon_reasons"]
    by_key = {m["hotkey"]: m for m in metrics["miners"]}
    bad = by_key.pop(net.keys["miners"][cheater].ss58_address)
    assert bad[counter] >= 1 and bad["health"] < 1.0
    for honest in by_key.values():
        assert honest["bad_outputs"] == 0 and honest["false_claims"] == 0, honest
