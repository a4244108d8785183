"""Bytes on the wire per token per boundary = k x element size (+ per-token scale, + fixed header),
measured on the real encoded stage output and the real gradient arriving at the boundary."""
from __future__ import annotations

import pytest
import torch

from resbm import ModelConfig, build_stages, codec

torch.set_num_threads(1)

B, T = 2, 8


def _per_token_payload(k: int, codec_name: str) -> int:
    """What the formula says one token's code costs without the per-message header."""
    return k * codec.element_bytes(codec_name) + codec.scale_bytes_per_vector(codec_name)


@pytest.mark.parametrize("ratio", [32, 64, 128])
@pytest.mark.parametrize("codec_name", ["fp32", "bf16", "fp8", "int8"])
def test_measured_bytes_per_token_forward_and_backward(ratio, codec_name):
    cfg = ModelConfig(d_model=512, n_heads=8, n_layers=2, n_stages=2, seq_len=T, bottleneck_ratio=ratio,
                      boundary="resbm", wire_codec=codec_name)
    k = 512 // ratio
    assert cfg.code_dim == k
    stage0, stage1 = build_stages(cfg, seed=0)
    gen = torch.Generator().manual_seed(ratio)
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)

    code = stage0(tokens)
    received = code.detach().requires_grad_(True)
    stage1(received, targets, tokens=tokens).backward()  # stage 1 re-injects the public tokens
    grad = received.grad

    assert grad.shape == (B, T, k)  # the gradient at a boundary is k wide, like the code
    fwd = codec.encode(code.detach(), codec_name)
    bwd = codec.encode(grad, codec_name)
    expected = codec.overhead_bytes() + B * T * _per_token_payload(k, codec_name)
    assert len(fwd) == len(bwd) == expected == codec.wire_size(cfg.code_shape(B), codec_name)
    assert cfg.wire_bytes_per_token(B) == (len(fwd) + len(bwd)) / (B * T)
    assert cfg.wire_bytes_per_token(B, "fwd") == len(fwd) / (B * T)
    # both directions are wire-exact: what was computed with is what the receiver decodes
    assert torch.equal(codec.decode(fwd, cfg.code_shape(B), codec_name, max_bytes=len(fwd)), code.detach())
    assert torch.equal(codec.decode(bwd, cfg.code_shape(B), codec_name, max_bytes=len(bwd)), grad)


def test_bottleneck_cuts_payload_by_r_against_uncompressed():
    for d, ratio in ((512, 128), (4096, 128)):
        base = dict(d_model=d, n_heads=8, n_layers=4, n_stages=2, seq_len=512, wire_codec="bf16")
        full = ModelConfig(boundary="none", **base)
        small = ModelConfig(boundary="resbm", bottleneck_ratio=ratio, **base)
        header = 2 * codec.overhead_bytes() / (4 * 512)
        full_payload = full.wire_bytes_per_token(4) - header
        small_payload = small.wire_bytes_per_token(4) - header
        assert full_payload == pytest.approx(2 * 2 * d)
        assert small_payload == pytest.approx(2 * 2 * (d // ratio))
        assert full_payload / small_payload == pytest.approx(ratio)


def test_wire_bytes_direction_is_checked():
    with pytest.raises(ValueError, match="direction"):
        ModelConfig.preset("tiny").wire_bytes_per_token(1, "sideways")
