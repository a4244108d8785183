"""Optimizer grouping (Muon for hidden matrices, AdamW for the rest), schedule and settings checks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from resbm import ModelConfig, build_model, build_stages
from resbm.optim import OptimConfig, build_optimizer, lr_multiplier, split_params

torch.set_num_threads(1)


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Independent statement of the rule: a 2-D weight of attention, MLP or a boundary projection."""
    leaf = name.split(".")
    hidden = {"wq", "wk", "wv", "wo", "gate", "up", "down", "proj"}
    return p.ndim == 2 and leaf[-1] == "weight" and leaf[-2] in hidden


@pytest.mark.parametrize("kind", ["resbm", "resbm-iota", "naive", "none"])
def test_every_hidden_matrix_in_muon_everything_else_in_adamw(kind):
    cfg = ModelConfig(vocab_size=50, d_model=64, n_heads=4, n_layers=4, n_stages=2, seq_len=8,
                      bottleneck_ratio=16, boundary=kind)
    for module in [build_model(cfg), nn.ModuleList(build_stages(cfg)), *build_stages(cfg)]:
        params = dict(module.named_parameters())
        muon, adamw = split_params(module)
        assert set(muon).isdisjoint(adamw)
        assert sorted(muon + adamw) == sorted(params)
        assert set(muon) == {n for n, p in params.items() if _is_hidden_matrix(n, p)}
        assert all(n.split(".")[-2] in ("embed", "head") or params[n].ndim == 1 for n in adamw)

        opt = build_optimizer(module, OptimConfig())
        in_muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]} \
            if muon else set()
        in_adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
        assert in_muon == {id(params[n]) for n in muon}
        assert in_adamw == {id(params[n]) for n in adamw}
    if kind != "none":
        assert any(".encoder.proj.weight" in n or ".encoder.down.weight" in n for n in split_params(build_model(cfg))[0])
        assert "boundaries.0.decoder.proj.weight" in split_params(build_model(cfg))[0]


def test_adamw_kind_puts_everything_in_adamw():
    cfg = ModelConfig.preset("tiny", vocab_size=50, seq_len=8)
    model = build_model(cfg)
    opt = build_optimizer(model, OptimConfig(kind="adamw"))
    assert list(opt.optimizers) == ["adamw"]
    n_params = sum(len(g["params"]) for g in opt.optimizers["adamw"].param_groups)
    assert n_params == len(list(model.parameters()))
    no_decay = opt.optimizers["adamw"].param_groups[1]
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_schedule_warmup_then_cosine_to_min():
    ocfg = OptimConfig(warmup_steps=4, total_steps=24, min_lr_ratio=0.1)
    assert lr_multiplier(ocfg, 0) == pytest.approx(0.25)
    assert lr_multiplier(ocfg, 3) == pytest.approx(1.0)
    assert lr_multiplier(ocfg, 4) == pytest.approx(1.0)
    assert lr_multiplier(ocfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert lr_multiplier(ocfg, 24) == pytest.approx(0.1)
    assert lr_multiplier(ocfg, 500) == pytest.approx(0.1)
    values = [lr_multiplier(ocfg, s) for s in range(4, 25)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_step_sets_the_scheduled_lr_first_and_moves_the_weights():
    cfg = ModelConfig.preset("tiny", vocab_size=50, seq_len=8)
    model = build_model(cfg)
    ocfg = OptimConfig(muon_lr=0.05, adamw_lr=0.01, warmup_steps=10, total_steps=100)
    opt = build_optimizer(model, ocfg)
    tokens = torch.randint(0, 50, (2, 8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(tokens, tokens).backward()
    opt.step(4)
    assert opt.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5)
    assert opt.optimizers["adamw"].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    # decoders start at zero and get a gradient at once; every weight with a gradient moves
    assert "boundaries.0.decoder.proj.weight" in moved and "blocks.0.attn.wq.weight" in moved
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fields,needle", [
    (dict(kind="sgd"), "kind"), (dict(muon_lr=0.0), "muon_lr"), (dict(adamw_lr=-1), "adamw_lr"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"), (dict(total_steps=0), "total_steps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(muon_momentum=1.0), "muon_momentum"),
])
def test_optim_config_errors_name_the_field(fields, needle):
    with pytest.raises(ValueError, match=needle):
        OptimConfig(**fields)


def test_optim_config_round_trip_rejects_unknown_keys():
    ocfg = OptimConfig(muon_lr=0.03, adamw_betas=(0.8, 0.9))
    assert OptimConfig.from_dict(ocfg.to_dict()) == ocfg
    with pytest.raises(ValueError, match="lr_muon"):
        OptimConfig.from_dict({"lr_muon": 1.0})
