"""Integrity drills at 3 replicas per stage (two honest, one cheating replica per stage), through the
real bridge, rclone S3, LocalChain, miners and validator (tests/harness): the same checks as at
R = 2 (tests/test_integrity_drills.py), held to the honest R = 3 subnet's loss."""
from __future__ import annotations

import pytest

from tests.harness.drill_checks import DRILL_ROUNDS, MERGE_PAIRS, check_drill
from tests.harness.subnet import Outcome, Scenario, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def honest_twin(tmp_path_factory) -> Outcome:
    """The same subnet with every replica honest (R = 3, seed 1)."""
    return run_scenario(tmp_path_factory.mktemp("honest3"), Scenario(honest_per_stage=3, rounds=DRILL_ROUNDS))


@pytest.mark.parametrize("pair", MERGE_PAIRS, ids=[f"{'+'.join(p)}-R3" for p in MERGE_PAIRS])
def test_one_cheater_per_stage_among_two_honest_cannot_capture_poison_or_stall(tmp_path, honest_twin, pair):
    out = run_scenario(tmp_path, Scenario(honest_per_stage=2, cheaters=pair, rounds=DRILL_ROUNDS))
    check_drill(out, honest_twin, DRILL_ROUNDS)
