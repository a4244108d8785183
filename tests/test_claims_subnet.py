"""Claim cheaters among real miners (bridge, rclone S3, LocalChain, in-process miners), both in one
subnet: a stage-0 producer that reports sha256s its uploads lack, and a stage-1 consumer that
claims every input is bad. Each is charged; the honest miners are not; no sample is lost."""
from __future__ import annotations

from functools import partial

import pytest

from drills.cheaters import cheating_miner
from neurons.miner_loop import Miner
from tests.harness.miner_subnet import MinerThread, run_config, set_threads, start_subnet

# miner index -> (cheater kind, the bridge counter that must charge it); registration alternates
# stages, so 2 is a second stage-0 replica (a producer of activations) and 3 a second stage-1
# replica (a consumer of them)
CHEATERS = {2: ("bad-sha", "bad_outputs"), 3: ("false-claim", "false_claims")}


@pytest.mark.timeout(150)
def test_claim_cheaters_are_charged_and_no_sample_is_lost(tmp_path):
    set_threads()
    # 12 samples: each of the 2 stage-1 replicas is leased inputs many times, so the consumer that
    # lies gets its chance (with 6 it sometimes got none and made no claim to charge)
    cfg = run_config(run_id="claims", samples_per_round=12, inner_steps_per_round=1,
                     total_rounds=1, micro_batches_per_step=2)
    net = start_subnet(tmp_path, cfg, miners=4)
    try:
        ms = [MinerThread(net, kp, make=partial(cheating_miner, CHEATERS[i][0]) if i in CHEATERS else Miner)
              for i, kp in enumerate(net.keys["miners"])]
        assert [m.assignment.stage for m in ms] == [0, 1, 0, 1]
        for m in ms:
            m.start()
        for m in ms:
            m.join(120)
        metrics = net.metrics()
    finally:
        net.stop()
    assert metrics["completed_total"] == 12 and metrics["abandoned_total"] == 0, metrics["abandon_reasons"]
    by_key = {m["hotkey"]: m for m in metrics["miners"]}
    for i, (kind, counter) in CHEATERS.items():
        bad = by_key.pop(net.keys["miners"][i].ss58_address)
        assert bad[counter] >= 1 and bad["health"] < 1.0, (kind, bad)
    for honest in by_key.values():
        assert honest["bad_outputs"] == 0 and honest["false_claims"] == 0, honest
