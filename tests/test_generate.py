"""Continuation with the KV cache (resbm.generate, resbm.model.KVCache): each new token costs one
position, the cached decode equals the full-context decode token for token (also across the
window slide past seq_len), and seeded sampling is reproducible."""
from __future__ import annotations

import pytest
import torch

from resbm.config import ModelConfig
from resbm.generate import SamplingConfig, generate, pick_token
from resbm.model import KVCache, build_model

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=16, bottleneck_dim=4)
PROMPT = [5, 9, 11, 300, 7]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(CFG, seed=1)
    with torch.no_grad():  # the zero-initialised boundary and re-injection tables get weights too
        g = torch.Generator().manual_seed(2)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m.eval()


def _positions_per_forward(model, **kw) -> tuple[list[int], list[int]]:
    seen: list[int] = []
    hook = model.embed.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        out = generate(model, PROMPT, 10, SamplingConfig(temperature=0), **kw)
    finally:
        hook.remove()
    return out, seen


def test_the_cache_makes_each_new_token_cost_one_position(model):
    cached, seen = _positions_per_forward(model)
    assert seen == [len(PROMPT)] + [1] * 9  # the prompt once, then one position per token
    full, seen_full = _positions_per_forward(model, use_cache=False)
    assert seen_full == [len(PROMPT) + i for i in range(10)]  # the whole context every step
    assert cached == full


def test_cached_logits_match_the_full_forward_at_every_position(model):
    tokens = torch.tensor([PROMPT + [1, 2, 3, 4]])
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(len(model.blocks))
        parts = [model(tokens[:, :5], cache=cache)] + [model(tokens[:, i:i + 1], cache=cache) for i in range(5, 7)]
        parts.append(model(tokens[:, 7:], cache=cache))  # two new positions after cached ones: masked
    assert cache.length == tokens.shape[1]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_greedy_is_deterministic_and_equals_the_no_cache_decode_past_the_context(model):
    runs = [generate(model, PROMPT, 40, SamplingConfig(temperature=0)) for _ in range(2)]
    reference = generate(model, PROMPT, 40, SamplingConfig(temperature=0), use_cache=False)
    assert runs[0] == runs[1] == reference and len(reference) == 40  # 40 > seq_len: the window slid


def test_seeded_sampling_is_reproducible_and_the_seed_matters(model):
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a, b = generate(model, PROMPT, 30, cfg), generate(model, PROMPT, 30, cfg)
    c = generate(model, PROMPT, 30, SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=8))
    assert a == b and a != c
    assert a == generate(model, PROMPT, 30, cfg, use_cache=False)


def test_top_k_and_top_p_keep_only_the_most_likely_tokens():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    draws = {pick_token(logits, SamplingConfig(temperature=1.0, top_k=2, seed=0), gen) for _ in range(200)}
    assert draws == {1, 2}
    draws = {pick_token(logits, SamplingConfig(temperature=1.0, top_p=0.01), gen) for _ in range(50)}
    assert draws == {1}  # the most likely token alone holds more than 1% of the mass
    assert pick_token(logits, SamplingConfig(temperature=0), gen) == 1


def test_generation_stops_at_the_stop_token_and_rejects_bad_settings(model):
    first = generate(model, PROMPT, 1, SamplingConfig(temperature=0))[0]
    assert generate(model, PROMPT, 10, SamplingConfig(temperature=0), stop_id=first) == []
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    with pytest.raises(ValueError, match="no tokens"):
        generate(model, [], 3, SamplingConfig())
    cache = KVCache(len(model.blocks))
    with torch.no_grad(), pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, CFG.seq_len + 1, dtype=torch.int64), cache=cache)
