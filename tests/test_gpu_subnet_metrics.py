"""The GPU subnet benchmark's arithmetic: stage FLOPs add up to the model's, merge time from
sampled phases, audit counts from validator log lines, the validator's lag."""
from resbm.config import ModelConfig
from scripts.gpu_subnet_metrics import (audit_counts, merge_seconds_per_round, mfu, round_shares, stage_flops_per_token,
                                        validator_lag)


def test_stage_flops_sum_to_the_model_and_mfu_scales():
    cfg = ModelConfig.preset("1b")
    assert 1.0e9 < cfg.matmul_params() < 1.1e9  # the preset's name is honest
    total = sum(stage_flops_per_token(cfg, s) for s in range(cfg.n_stages))
    assert abs(total - cfg.flops_per_token()) / cfg.flops_per_token() < 1e-9
    assert stage_flops_per_token(cfg, 3) > stage_flops_per_token(cfg, 1)  # the head is on the last stage
    assert mfu(1e9, 1e3, 1.0, 1e13) == 0.1 and mfu(1e9, 1e3, 0.0, 1e13) is None and mfu(1e9, 1e3, 1.0, None) is None


def test_merge_seconds_audits_and_lag():
    samples = [(0.0, 0, "train"), (1.0, 0, "merge"), (3.5, 0, "merge"), (4.0, 1, "train"), (9.0, 1, "merge"), (10.0, 1, "merge")]
    assert merge_seconds_per_round(samples) == {0: 3.0, 1: 1.0}
    log = ("x audit of 5FLKPz7T round 0: PASS (1.2s)\nx audit of 5Gj17DGE round 0: FAIL - rel err (0.1s)\n"
           "x audit of 5EZj1qNp round 1 incomplete: gone\nx audit of 5FLKPz7T round 1: PASS (1.0s)\n")
    assert audit_counts(log) == {"run": 3, "passed": 2, "failed": 1, "incomplete": 1, "seconds": 2.3}
    assert validator_lag(3, "train", 1) == 2 and validator_lag(3, "done", 4) == 0 and validator_lag(0, "train", 5) == 0


def test_round_shares_give_each_closed_rounds_sync_share():
    samples = [(0.0, 0, "train"), (8.0, 0, "merge"), (10.0, 1, "train"), (17.0, 1, "merge"), (18.0, 2, "train"),
               (19.0, 2, "train")]
    shares = round_shares(samples)
    assert set(shares) == {0, 1}  # round 2 is still open
    assert shares[0] == {"train": 8.0, "merge": 2.0, "sync_share": 0.2}
    assert shares[1]["merge"] == 1.0 and abs(shares[1]["sync_share"] - 0.125) < 1e-12
