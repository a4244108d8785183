"""The cheat hooks the miner calls: each deviates exactly where a validator must notice."""
from __future__ import annotations

import pytest
import torch

from drills.hop_cheats import CHEATS, Cheat


def test_copy_repeats_the_previous_output_and_gradient():
    c = Cheat("copy")
    a, b = torch.ones(2, 3), torch.full((2, 3), 2.0)
    assert torch.equal(c.forward_output(a, None), a)  # nothing to copy yet
    assert torch.equal(c.forward_output(b, None), a)
    assert torch.equal(c.input_grad(a * 3, None), a * 3)
    assert torch.equal(c.input_grad(b * 3, None), a * 3)


def test_honest_changes_nothing_and_lazy_scales():
    x = torch.randn(4, 5)
    h = Cheat("honest")
    assert h.forward_output(x, None) is x and h.input_grad(x, None) is x
    assert not h.skip_step() and not h.skip_upload(None)
    lazy = Cheat("lazy", lazy_scale=0.5)
    assert torch.equal(lazy.input_grad(x, None), x * 0.5)
    assert torch.equal(lazy.pseudo_gradient({"w": x})["w"], x * 0.5)
    assert Cheat("stale").skip_step() and Cheat("phantom").skip_upload(None)


def test_random_output_is_unrelated_but_same_scale():
    x = torch.randn(64, 64)
    y = Cheat("random", seed=3).forward_output(x, None)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert abs(float(y.std() / x.std()) - 1.0) < 0.1


def test_unknown_cheat_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown cheat 'sneaky'"):
        Cheat("sneaky")
    assert set(CHEATS) >= {"honest", "random", "stale", "copy", "lazy", "phantom"}
