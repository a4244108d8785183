"""The sharded sync recovers from what a majority vote cannot stop and from falling behind, with
real miners, the real validator, bridge and rclone S3:
- two colluding replicas of three (one owner's sybils, the `liar` drill twice on one stage) vote
  their own merged updates and checkpoint: the honest replica's dissent makes each a dispute, the
  validator's recomputation decides the honest update every round (0 rounds of the colluders'
  state ever published), fails both colluders and never the honest one, which alone earns;
- an honest replica stuck in its merge until the bridge no longer keeps its round's updates
  (`updates_pruned`) catches up from the latest checkpoint, agrees bit for bit, and earns again."""
from __future__ import annotations

import pytest
import torch

from tests.harness.drill_checks import SHARDED, check_honest_updates
from tests.harness.subnet import Scenario, run_scenario

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_two_colluding_replicas_of_three_never_decide_and_the_validator_fails_them(tmp_path):
    rounds = 4
    out = run_scenario(tmp_path, Scenario(stages=1, honest_per_stage=1, cheaters=("liar", "liar"), rounds=rounds,
                                          run=SHARDED))
    (honest,) = out.honest()
    hk = out.names[honest]
    colluders = {out.names[n] for n in out.cheaters()}
    assert out.metrics.phase == "done" and out.stage_of[honest] == 0 and len(colluders) == 2
    assert all(s.published_round == rounds for s in out.metrics.stages), "the stage stalled"
    check_honest_updates(out)  # every shard of every round: the honest merger's update
    lied = [(r, s) for (r, _), v in out.views.items() for s, cast in enumerate(v.votes)
            if colluders & set(cast) and {cast[c] for c in colluders & set(cast)} != {cast.get(hk)}]
    assert lied, "the colluders never voted against the honest replica: the drill did not run"
    for log in out.hoplogs:  # checkpoints: the honest vote is published, the colluders' flagged
        assert hk not in log.flagged, f"round {log.round}: the honest replica was flagged"
    assert colluders <= {h for log in out.hoplogs for h in log.flagged}
    failed = {v[1] for v in out.verdicts if not v[2]}
    assert {n for n in out.cheaters()} <= failed and honest not in failed, out.verdicts
    assert out.weights[honest] > 0 and all(out.weights[n] == 0.0 for n in out.cheaters()), out.weights
    assert out.val_loss < out.init_loss, "the model did not train"


def test_a_replica_behind_past_the_pruning_window_catches_up_from_the_latest_checkpoint(tmp_path):
    # audit_window_rounds 1 keeps 3 rounds of update logs; with a checkpoint every 2 rounds the
    # updates of round 0 (needed to rebuild round 1's start) are dropped once round 4 is decided
    rounds, stall, resume = 8, 1, 5
    run = SHARDED + (("audit_window_rounds", 1), ("vote_timeout_seconds", 10.0))
    # speed routing off: on a loaded box one slow hop would leave the laggard a probe per 30 s and no
    # merge to stall in (bridge/speed.py); this test is about catching up, not routing
    out = run_scenario(tmp_path, Scenario(stages=1, honest_per_stage=2, rounds=rounds, laggard=(stall, resume),
                                          run=run, bridge_flags=("--slow-factor", "0")))
    lag = out.laggard
    assert lag is not None and len(lag["seen"]) == 2 and lag["seen"][1] == "updates_pruned", lag and lag["seen"]
    stalled = int(lag["seen"][0].rsplit(" ", 1)[1])  # `stall`, or later when a loaded box routed it no work then
    assert stalled <= stall + 1, lag["seen"]
    back = stalled + resume - stall
    assert out.metrics.phase == "done" and all(s.published_round == rounds for s in out.metrics.stages)
    after = [c for c in lag["catch_ups"] if c[0] > stalled]  # a loaded box may leave it behind again later
    assert after, lag["catch_ups"]
    at, (ckpt, replayed) = after[0]
    assert at >= back and ckpt >= back - 1 and replayed == at - ckpt <= 1, lag["catch_ups"]  # the latest one
    assert all(torch.equal(lag["theta"][n], lag["peer_theta"][n]) for n in lag["theta"]), "the laggard diverged"
    assert out.weights[lag["name"]] > 0, out.weights  # it earned again after catching up
    assert not [v for v in out.verdicts if not v[2]], out.verdicts  # slow is not dishonest
    check_honest_updates(out)
