"""BatchedMuon computes torch.optim.Muon's update (batched Newton-Schulz), and their states interchange."""
from __future__ import annotations

import copy

import pytest
import torch

from resbm.muon import BatchedMuon, newton_schulz

torch.set_num_threads(1)

# wide, tall, square, thin boundary-like matrices, several of each shape (so batches and chunks form)
SHAPES = [(16, 40), (40, 16), (16, 40), (24, 24), (24, 24), (24, 24), (2, 24), (24, 2), (40, 16)]


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def _run(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("max_batch", [1 << 28, 700])  # 700 elements: every shape split into several chunks
def test_batched_muon_equals_torch_muon(nesterov, max_batch):
    ref, new = _params(0), _params(0)
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn="original")
    torch_opt, batched = torch.optim.Muon(ref, **kw), BatchedMuon(new, max_batch_elements=max_batch, **kw)
    _run(torch_opt, ref, 4, seed=1)
    _run(batched, new, 4, seed=1)
    for a, b, start in zip(ref, new, _params(0)):
        moved = (a - start).detach().abs().max()
        assert moved > 0.01
        # the same ops in the same order; a batched product may round differently from a single one
        # (bf16, amplified by the iteration): equal to within 2% of the weights' movement
        torch.testing.assert_close(b - start, a - start, rtol=0, atol=0.02 * float(moved))
        torch.testing.assert_close(batched.state[b]["momentum_buffer"], torch_opt.state[a]["momentum_buffer"])


def test_state_dicts_move_between_the_two_implementations():
    ref, new = _params(2), _params(2)
    torch_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    _run(torch_opt, ref, 2, seed=3)
    with torch.no_grad():
        for a, b in zip(ref, new):
            b.copy_(a)
    batched = BatchedMuon(new, lr=0.5)  # settings come from the loaded state
    batched.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # load_state_dict may share the tensors
    assert batched.param_groups[0]["lr"] == 0.02
    assert set(batched.param_groups[0]) == set(torch_opt.param_groups[0])
    _run(torch_opt, ref, 2, seed=4)
    _run(batched, new, 2, seed=4)
    for a, b in zip(ref, new):
        torch.testing.assert_close(b, a, rtol=0, atol=2e-4)  # see above: bf16 rounding of batched products
    back = torch.optim.Muon(_params(9), lr=0.1)
    back.load_state_dict(copy.deepcopy(batched.state_dict()))  # and the other way round
    assert back.param_groups[0]["lr"] == 0.02 and len(back.state) == len(SHAPES)


def test_newton_schulz_orthogonalises_every_matrix_of_a_batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 8, 32, generator=gen).bfloat16()
    out = newton_schulz(x.clone()).float()
    sv = torch.linalg.svdvals(out)
    assert sv.shape == (3, 8)
    assert float(sv.min()) > 0.5 and float(sv.max()) < 1.5  # the quintic's band around 1, for each matrix
    one = newton_schulz(x[1:2].clone()).float()
    assert torch.equal(one[0], out[1])  # a matrix's result does not depend on its batch neighbours
    with pytest.raises(ValueError, match="m <= k"):
        newton_schulz(torch.zeros(2, 9, 4, dtype=torch.bfloat16))


def test_settings_and_shapes_are_checked():
    with pytest.raises(ValueError, match="2-D"):
        BatchedMuon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        BatchedMuon(_params(0), adjust_lr_fn="other")
    with pytest.raises(ValueError, match=">= 0"):
        BatchedMuon(_params(0), lr=-1.0)
    opt = BatchedMuon(_params(0))
    opt.step()  # no gradients: nothing moves, no state
    assert len(opt.state) == 0
