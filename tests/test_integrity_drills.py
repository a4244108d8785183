"""Integrity drills at 2 replicas per stage: one cheating replica per stage through the real bridge,
rclone S3, LocalChain, miners and validator (tests/harness). Each run checks that the honest state
is published, the cheater earns nothing, every honest miner keeps weight, no sample is lost, and the
validation loss stays within noise of the same subnet with the cheater honest over the rounds no
cheater took part in (tests/harness/drill_checks.check_loss). (R = 3:
tests/test_integrity_drills_r3.py.)"""
from __future__ import annotations

import pytest
import torch

from tests.harness.drill_checks import DRILL_ROUNDS, MERGE_PAIRS, SHARDED, check_drill
from tests.harness.subnet import Outcome, Scenario, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = DRILL_ROUNDS
PAIRS = MERGE_PAIRS + (("withhold", "stale"),)


@pytest.fixture(scope="module")
def honest_twin(tmp_path_factory) -> Outcome:
    """The same subnet with every replica honest (R = 2, seed 1)."""
    return run_scenario(tmp_path_factory.mktemp("honest2"), Scenario(honest_per_stage=2, rounds=ROUNDS))


@pytest.mark.parametrize("pair", PAIRS, ids=[f"{'+'.join(p)}-R2" for p in PAIRS])
def test_one_cheater_per_stage_cannot_capture_poison_or_stall(tmp_path, honest_twin, pair):
    out = run_scenario(tmp_path, Scenario(honest_per_stage=1, cheaters=pair, rounds=ROUNDS))
    check_drill(out, honest_twin, ROUNDS)


# The sharded sync (issue 13): a merger lies about the shards it is assigned and a sender's shards
# decode to NaN, at R = 2 (every shard disputed, settled by the validator); an honest replica joins
# in round 3, catches up from the checkpoint of round 2 plus round 2's merged update, and earns weight.
# The other drills on the sharded path: tests/test_sharded_drills.py.


def test_sharded_sync_liar_and_nan_are_defeated_and_a_joiner_catches_up(tmp_path, honest_twin):
    rounds = ROUNDS + 1
    out = run_scenario(tmp_path, Scenario(honest_per_stage=1, cheaters=("liar", "nan"), rounds=rounds,
                                          run=SHARDED, join_round=3))
    check_drill(out, honest_twin, rounds)
    j = out.joined
    assert j is not None and j["round"] >= 3 and j["caught_up"] is not None
    ckpt, replayed = j["caught_up"]
    assert ckpt == 2 and replayed == j["round"] - ckpt >= 1, j["caught_up"]
    assert out.weights[j["name"]] > 0, out.weights
    assert all(torch.equal(j["theta"][n], j["peer_theta"][n]) for n in j["theta"]), "the joiner diverged"
    rebuilt, advanced = out.round_starts  # the validator's round starts: most from the round before
    assert advanced >= 1 and rebuilt >= 1, out.round_starts



def test_a_validator_busy_elsewhere_still_settles_every_dispute_before_its_deadline(tmp_path):
    """Disputes are settled on a thread of their own: a liar per stage forces one in every round it merges,
    the validator's loop spends 20 s per pass elsewhere (a long audit), the arbitration deadline is
    8 s, and no stage ever keeps its state for want of an answer."""
    rounds = 2
    out = run_scenario(tmp_path, Scenario(honest_per_stage=1, cheaters=("liar", "liar"), rounds=rounds, busy_seconds=20.0,
                                          run=(("arbitration_timeout_seconds", 8.0),)))
    check_drill(out, None, rounds)
    assert 0 in out.cheated_rounds(), "the liar never merged: no dispute was opened"
