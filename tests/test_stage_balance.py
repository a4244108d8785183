"""Balancing stages by measured time (issue 24 item 4): the pure split function."""
from __future__ import annotations

import math

import pytest

from resbm.stage_balance import balance_layers, imbalance


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
