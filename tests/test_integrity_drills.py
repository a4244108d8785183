"""Integrity drills: one cheating replica per stage, at 2 and at 3 replicas per stage, through the
real bridge, rclone S3, LocalChain, miners and validator (tests/harness). Each run checks that the
honest state is published, the cheater earns nothing, every honest miner keeps weight, no sample is
lost, and the validation loss stays within noise of the same subnet with the cheater honest."""
from __future__ import annotations

import pytest
import torch

from tests.harness.drill_checks import SHARDED, check_drill
from tests.harness.subnet import Outcome, Scenario, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAIRS = (("liar", "flip"), ("huge", "nan"), ("overwrite", "lazy"))
ROUNDS = 4


@pytest.fixture(scope="module")
def honest_runs(tmp_path_factory) -> dict[int, Outcome]:
    """The same subnets with every replica honest (R = 2 and 3, seed 1)."""
    return {r: run_scenario(tmp_path_factory.mktemp(f"honest{r}"), Scenario(honest_per_stage=r, rounds=ROUNDS))
            for r in (2, 3)}


CASES = [(p, r) for r in (2, 3) for p in PAIRS] + [(("withhold", "stale"), 2)]


@pytest.mark.parametrize("pair,replicas", CASES, ids=[f"{'+'.join(p)}-R{r}" for p, r in CASES])
def test_one_cheater_per_stage_cannot_capture_poison_or_stall(tmp_path, honest_runs, pair, replicas):
    out = run_scenario(tmp_path, Scenario(honest_per_stage=replicas - 1, cheaters=pair, rounds=ROUNDS))
    check_drill(out, honest_runs[replicas], ROUNDS)


# The sharded sync (issue 13): a merger lies about the shards it is assigned and a sender's shards
# decode to NaN, at R = 2 (every shard disputed, settled by the validator); an honest replica joins
# in round 3, catches up from the checkpoint of round 2 plus round 2's merged update, and earns weight.
# The other drills on the sharded path: tests/test_sharded_drills.py.


def test_sharded_sync_liar_and_nan_are_defeated_and_a_joiner_catches_up(tmp_path, honest_runs):
    rounds = ROUNDS + 1
    out = run_scenario(tmp_path, Scenario(honest_per_stage=1, cheaters=("liar", "nan"), rounds=rounds,
                                          run=SHARDED, join_round=3))
    check_drill(out, honest_runs[2], rounds)
    j = out.joined
    assert j is not None and j["round"] >= 3 and j["caught_up"] is not None
    ckpt, replayed = j["caught_up"]
    assert ckpt == 2 and replayed == j["round"] - ckpt >= 1, j["caught_up"]
    assert out.weights[j["name"]] > 0, out.weights
    assert all(torch.equal(j["theta"][n], j["peer_theta"][n]) for n in j["theta"]), "the joiner diverged"
    rebuilt, advanced = out.round_starts  # the validator's round starts: most from the round before
    assert advanced >= 1 and rebuilt >= 1, out.round_starts

