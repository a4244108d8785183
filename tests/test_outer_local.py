"""The device-side one-replica outer step equals resbm.outer's CPU merge + Nesterov step bit for bit."""
from __future__ import annotations

import pytest
import torch

from resbm import outer
from resbm.outer_local import LocalOuterStep, one_replica_merge_is_identity
from resbm.robust_merge import MergeParams, robust_merge

torch.set_num_threads(1)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("method", ["robust", "clipped-mean", "mean"])
@pytest.mark.parametrize("lr,mu", [(1.0, 0.0), (0.7, 0.9)])
def test_local_outer_step_is_bit_identical_to_the_cpu_merge_and_nesterov(method, lr, mu):
    gen = torch.Generator().manual_seed(1)
    names = ["a", "b", "c"]
    weights = {"a": torch.randn(5, 7, generator=gen), "b": torch.randn(11, generator=gen),
               "c": torch.zeros(3, 3)}  # stays zero: exercises the sign of zero
    weights["c"][0, 0] = -0.0
    live = [weights[n].clone() for n in names]
    local = LocalOuterStep(live, lr=lr, momentum=mu)
    live[2][0, 0] = 0.0  # a local step that moved -0.0 to +0.0: the pseudo-gradient there is -0.0
    start = {n: weights[n].clone() for n in names}
    momentum = None
    for _ in range(3):  # a few rounds of local training, then the outer step
        for t in live[:2]:
            t.add_(0.01 * torch.randn(t.shape, generator=gen))
        theta = dict(zip(names, live))
        pg = outer.pseudo_gradient(start, theta)
        if method == "robust":
            merged, _ = robust_merge([(8, pg)], None, MergeParams(clip_factor=2.0))
        else:
            merged = outer.merge([(8, pg)], method=method, clip_factor=2.0)
        start, momentum = outer.nesterov_step(start, merged, momentum, lr=lr, momentum_coef=mu)
        local.step()
        for n, t in zip(names, live):
            assert torch.equal(_bits(t), _bits(start[n])), n
            assert torch.equal(_bits(local.momentum[names.index(n)]), _bits(momentum[n])), n


def test_only_merges_that_leave_one_replica_unchanged_are_accepted():
    assert one_replica_merge_is_identity("robust", 1.0) and one_replica_merge_is_identity("mean", 0.5)
    assert one_replica_merge_is_identity("clipped-mean", 2.0)
    assert not one_replica_merge_is_identity("clipped-mean", 0.5)
    assert not one_replica_merge_is_identity("trimmed-mean", 2.0)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="outer lr"):
        LocalOuterStep([torch.zeros(2)], lr=0.0, momentum=0.5)
    with pytest.raises(ValueError, match="momentum"):
        LocalOuterStep([torch.zeros(2)], lr=1.0, momentum=1.0)
    with pytest.raises(ValueError, match="fp32"):
        LocalOuterStep([torch.zeros(2, dtype=torch.float64)], lr=1.0, momentum=0.5)
