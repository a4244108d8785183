"""Every merge-level drill on the sharded sync (`flip`, `huge`, `lazy`, `overwrite`, `withhold`, and
the hop-level `stale`), one cheating replica per stage, through the real bridge, rclone S3,
LocalChain, miners and validator: the honest replicas' update is decided in every round, the
cheater earns nothing (and is failed where it can be told from a crashed replica), every honest
miner earns, no sample is lost, and the loss stays within noise of the honest sharded twin.
(`liar` and `nan` on the sharded path: tests/test_integrity_drills.py.)"""
from __future__ import annotations

import pytest

from tests.harness.drill_checks import SHARDED, check_drill
from tests.harness.subnet import Outcome, Scenario, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = 4
# Every drill at R = 2 (where one replica weighs as much as the honest one), and the pair whose
# defence changes most at R = 3 (the trimmed mean, and the withholding grace with two reporters).
CASES = [(("huge", "lazy"), 2), (("overwrite", "stale"), 2), (("flip", "withhold"), 2), (("flip", "withhold"), 3)]


@pytest.fixture(scope="module")
def honest_sharded(tmp_path_factory) -> Outcome:
    """The same sharded subnet with every replica honest (R = 2, seed 1)."""
    return run_scenario(tmp_path_factory.mktemp("honest"), Scenario(honest_per_stage=2, rounds=ROUNDS, run=SHARDED))


@pytest.mark.parametrize("pair,replicas", CASES, ids=[f"{'+'.join(p)}-R{r}" for p, r in CASES])
def test_every_drill_is_defeated_on_the_sharded_sync(tmp_path, honest_sharded, pair, replicas):
    out = run_scenario(tmp_path, Scenario(honest_per_stage=replicas - 1, cheaters=pair, rounds=ROUNDS, run=SHARDED))
    assert len(out.views) == ROUNDS * 2  # the honest update decided: every round, both stages
    # R = 3 has no honest sharded twin here: its update is checked shard by shard instead
    check_drill(out, honest_sharded if replicas == 2 else None, ROUNDS)
