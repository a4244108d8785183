"""Factored token re-injection (ModelConfig.token_reinject_rank): the auto rule, the parameter cost,
a no-op at init, AdamW for both factors, and the same stage/model split as the full table."""
from __future__ import annotations

import pytest
import torch

from resbm.boundary import FactoredEmbedding
from resbm.config import ModelConfig
from resbm.model import build_model
from resbm.optim import split_params
from resbm.stages import build_stages

BASE = dict(d_model=64, n_layers=4, n_heads=4, seq_len=16, n_stages=2, bottleneck_dim=8)


def _cfg(**over) -> ModelConfig:
    return ModelConfig(**(BASE | over))


def test_auto_rank_factors_only_a_large_vocab_at_a_wide_model():
    assert ModelConfig(vocab_size=4096, d_model=1024, n_layers=8, n_heads=16).reinject_rank == 0
    assert ModelConfig(vocab_size=32768, d_model=1024, n_layers=8, n_heads=16).reinject_rank == 256
    assert ModelConfig(vocab_size=32768, d_model=256, n_layers=2, n_heads=4).reinject_rank == 0
    assert ModelConfig(vocab_size=32768, d_model=1024, n_layers=8, n_heads=16,
                       token_reinject_rank=0).reinject_rank == 0
    for bad in (-1, 65, True, 2.0):
        with pytest.raises(ValueError, match="token_reinject_rank"):
            _cfg(vocab_size=97, token_reinject_rank=bad)


def test_factored_table_costs_r_times_v_plus_d_and_starts_as_a_no_op():
    full, fact = _cfg(vocab_size=500, token_reinject_rank=0), _cfg(vocab_size=500, token_reinject_rank=8)
    mf, mr = build_model(full, seed=1), build_model(fact, seed=1)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(mf) - n(mr) == (500 * 64) - 8 * (500 + 64)
    emb = mr.boundaries["0"].decoder.embed
    assert isinstance(emb, FactoredEmbedding) and float(emb.up.abs().sum()) == 0.0
    assert float(emb.table.weight.std()) == pytest.approx(1.0, rel=0.1)
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    off = build_model(_cfg(vocab_size=500, token_reinject=False), seed=1)
    assert torch.allclose(mr(tokens), off(tokens), atol=1e-6)  # zero `up`: same function at init
    muon, adamw = split_params(mr)  # both factors are embedding parameters: AdamW, as in the benchmark
    assert {"boundaries.0.decoder.embed.table.weight", "boundaries.0.decoder.embed.up"} <= set(adamw)
    assert not any("embed" in n for n in muon)


def test_stages_get_the_same_factored_weights_as_the_model():
    cfg = _cfg(vocab_size=300, token_reinject_rank=4)
    model, stages = build_model(cfg, seed=3), build_stages(cfg, seed=3)
    flat = dict(model.named_parameters())
    got = {n: p for s in stages for n, p in s.named_parameters() if "embed.table" in n}
    assert got, "stage 1 should own the factored table"
    for n, p in got.items():
        assert torch.equal(p, flat["boundaries.0.decoder.embed.table.weight"])
