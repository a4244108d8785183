"""The fused default boundary (`postnorm-fused`) computes what `postnorm` computes, forward and
backward, in fp32 and under bf16 autocast, and keeps fewer bytes for the backward."""
import pytest
import torch

from resbm.boundary_kinds import build_boundary
from resbm.config import ModelConfig
from scripts.bench_boundary_memory import saved_bytes


def _run(module, h, tokens, autocast):
    x = h.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = module(x, tokens)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach().float(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_matches_postnorm(autocast):
    torch.manual_seed(0)
    plain = build_boundary(ModelConfig.preset("tiny", boundary_variant="postnorm"))
    fused = build_boundary(ModelConfig.preset("tiny", boundary_variant="postnorm-fused"))
    for p in plain.parameters():
        torch.nn.init.normal_(p, 0.0, 0.3)  # D = 0 and zero tables at init would hide the decoder's paths
    fused.load_state_dict(plain.state_dict())
    h, tokens = torch.randn(2, 16, 64), torch.randint(0, 4096, (2, 16))
    ya, ga, pa = _run(plain, h, tokens, autocast)
    yb, gb, pb = _run(fused, h, tokens, autocast)
    assert set(pa) == set(pb) and len(pa) == 5
    torch.testing.assert_close(yb, ya, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-6)
    for name in pa:
        assert pa[name].abs().sum() > 0, name
        torch.testing.assert_close(pb[name], pa[name], rtol=1e-5, atol=1e-6)


def test_fused_keeps_less_for_the_backward():
    kw = dict(d_model=128, n_heads=4, n_layers=4, n_stages=2, seq_len=32, bottleneck_ratio=16)
    plain = saved_bytes(ModelConfig.preset("tiny", boundary_variant="postnorm", **kw), 2, autocast=True)
    fused = saved_bytes(ModelConfig.preset("tiny", boundary_variant="postnorm-fused", **kw), 2, autocast=True)
    assert fused < plain
