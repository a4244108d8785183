"""Balancing stages by measured time (issue 24 item 4): the pure split function."""
from __future__ import annotations

import json
import math

import pytest

from resbm.stage_balance import balance_from_runs, balance_layers, imbalance


def test_balanced_stages_keep_their_split():
    b = balance_layers((2, 2), (1.0, 1.0))
    assert b.layers == (2, 2) and b.before == 0.0 and b.after == 0.0


def test_an_uneven_split_of_equal_blocks_is_evened_out():
    b = balance_layers((3, 1), (3.0, 1.0))
    assert b.layers == (2, 2) and b.per_layer == 1.0 and b.overhead == (0.0, 0.0)
    assert b.before == pytest.approx(2 / 3) and b.after == 0.0


def test_a_stage_twice_as_heavy_gives_blocks_to_the_other_until_they_match():
    b = balance_layers((2, 2), (2.0, 1.0))  # stage 0 spends 1 s beyond its blocks (say, a slow device)
    assert b.per_layer == 0.5 and b.overhead == pytest.approx((1.0, 0.0))
    assert b.layers == (1, 3) and b.predicted == pytest.approx((1.5, 1.5)) and b.after <= 0.1
    assert b.before == pytest.approx(0.5)


def test_the_split_keeps_every_block_and_at_least_one_per_stage():
    b = balance_layers((4, 4, 4), (9.0, 1.0, 1.0))
    assert sum(b.layers) == 12 and min(b.layers) >= 1
    assert b.layers[0] == 1  # the heavy stage keeps only what it must
    assert max(b.predicted) <= 9.0 and b.after < b.before


def test_bad_measurements_are_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="one measured time per stage"):
        balance_layers((2, 2), (1.0,))
    with pytest.raises(ValueError, match="positive and finite"):
        balance_layers((2, 2), (1.0, math.nan))
    with pytest.raises(ValueError, match="positive and finite"):
        balance_layers((2, 2), (1.0, 0.0))
    with pytest.raises(ValueError, match="at least one whole block"):
        balance_layers((0, 4), (1.0, 1.0))


def test_imbalance_is_the_fast_stage_wait_as_a_share_of_the_slow_one():
    assert imbalance((1.0, 0.9)) == pytest.approx(0.1) and imbalance((0.0, 0.0)) == 0.0


def test_several_measured_splits_fit_each_stage_its_own_cost_per_block():
    # stage 0: 0.25 s + 0.6 s per block; stage 1: 1.25 s (LM head) + 0.4 s per block; 6 blocks
    f0, f1 = (lambda n: 0.25 + 0.6 * n), (lambda n: 1.25 + 0.4 * n)
    runs = [((5, 1), (f0(5), f1(1))), ((4, 2), (f0(4), f1(2)))]
    one = balance_layers(*runs[0])  # from the skewed split alone: the head looks like 1 s of overhead
    b = balance_from_runs(runs)
    assert b.overhead == pytest.approx((0.25, 1.25)) and b.layers == (3, 3)
    assert b.predicted == pytest.approx((f0(3), f1(3))) and b.after < imbalance((f0(4), f1(2)))
    assert one.layers == (4, 2)
    with pytest.raises(ValueError, match="same number of blocks"):
        balance_from_runs([((5, 1), (1.0, 1.0)), ((3, 2), (1.0, 1.0))])


def _bench_json(tmp_path, name, layers, stage_seconds, samples=10):
    miners = [{"stage": s, "compute_s": t * samples / 2} for s, t in enumerate(stage_seconds) for _ in range(2)]
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"args": {"stage_layers": layers}, "results": [{"samples": samples, "miners": miners}]}))
    return str(p)


def test_the_command_reads_bench_runs_and_prints_the_split(tmp_path, capsys):
    from scripts.balance_stages import main
    f0, f1 = (lambda n: 0.25 + 0.6 * n), (lambda n: 1.25 + 0.4 * n)
    files = [_bench_json(tmp_path, "a", "5,1", (f0(5), f1(1))), _bench_json(tmp_path, "b", "4,2", (f0(4), f1(2)))]
    assert main(files) == 0
    out = capsys.readouterr().out
    assert "| 5,1 | 3.250 / 1.650 | 49% |" in out and "suggested --stage-layers 3,3" in out
    assert main([str(tmp_path / "missing.json")]) == 2  # one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.json" in err and err.count("\n") == 1
