"""Model, boundaries and stages: staged == monolithic exactly, state dicts move both ways, config checks."""
from __future__ import annotations

import pytest
import torch

from resbm import ModelConfig, build_model, build_stages, codec
from resbm.config import BOUNDARY_VARIANTS, DEFAULT_RESBM_VARIANT
from resbm.stages import merge_stage_states, run_pipeline, stage_param_names, stage_state_dict

torch.set_num_threads(1)

KIND_VARIANTS = [(kind, v) for kind, vs in BOUNDARY_VARIANTS.items() for v in vs]


def _cfg(kind: str, variant: str, n_stages: int, codec_name: str = "fp32", **kw) -> ModelConfig:
    return ModelConfig(vocab_size=97, d_model=64, n_layers=2 * n_stages - 1 if n_stages == 3 else 4,
                       n_heads=4, seq_len=16, n_stages=n_stages, bottleneck_ratio=16, boundary=kind,
                       boundary_variant=variant, wire_codec=codec_name,
                       stage_layers=(2, 2, 1) if n_stages == 3 else None, **kw)


def _perturbed_model(cfg: ModelConfig, seed: int = 3) -> torch.nn.Module:
    """A model whose zero-initialised decoders are nonzero, so every path carries signal and gradient."""
    model = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("n_stages", [2, 3])
@pytest.mark.parametrize("kind,variant", KIND_VARIANTS)
@pytest.mark.parametrize("codec_name", ["fp32", "int8"])
@pytest.mark.parametrize("reinject", [True, False])
def test_stages_in_sequence_equal_monolithic_forward_and_backward(kind, variant, n_stages, codec_name, reinject):
    cfg = _cfg(kind, variant, n_stages, codec_name, token_reinject=reinject)
    model = _perturbed_model(cfg)
    stages = build_stages(cfg, seed=99)  # different init, then overwritten from the model
    state = model.state_dict()
    for s, stage in enumerate(stages):
        stage.load_state_dict(stage_state_dict(state, cfg, s))
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=gen)
    targets = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len), generator=gen)

    loss = model(tokens, targets)
    loss.backward()
    result = run_pipeline(stages, tokens, targets)

    assert result.loss == loss.item()
    ref = dict(model.named_parameters())
    n_checked = 0
    for stage in stages:
        for name, p in stage.named_parameters():
            assert p.grad is not None, name
            assert torch.equal(p.grad, ref[name].grad), f"gradient of {name} differs"
            n_checked += 1
    assert n_checked == len(ref)  # every model parameter lives in exactly one stage
    assert len(result.codes) == len(result.code_grads) == n_stages - 1
    for z, g in zip(result.codes, result.code_grads):
        assert z.shape == g.shape == cfg.code_shape(3)
        assert g.abs().sum() > 0


def test_default_config_is_postnorm_resbm_with_token_reinjection():
    cfg = ModelConfig(bottleneck_ratio=16)  # every other field at its default
    # postnorm-fused is the same formula and parameters (test_boundary_fused.py); either may be the default
    assert DEFAULT_RESBM_VARIANT in ("postnorm", "postnorm-fused")
    assert (cfg.boundary, cfg.boundary_variant, cfg.token_reinject) == ("resbm", DEFAULT_RESBM_VARIANT, True)
    assert ModelConfig.preset("tiny").boundary_variant == DEFAULT_RESBM_VARIANT
    assert sorted(BOUNDARY_VARIANTS["resbm"]) == ["literal", "normed", "postnorm", "postnorm-fused"]
    names = set(build_model(ModelConfig.preset("tiny", n_stages=2)).state_dict())
    assert {"boundaries.0.decoder.norm.weight", "boundaries.0.decoder.embed.weight"} <= names


@pytest.mark.parametrize("kind,variant", [("resbm-iota", "fused-mlp"), ("resbm", "postnorm")])
def test_stage_init_matches_model_init_for_the_same_seed(kind, variant):
    cfg = _cfg(kind, variant, 3)
    model_state = build_model(cfg, seed=5).state_dict()
    other = build_model(cfg, seed=6).state_dict()
    for stage in build_stages(cfg, seed=5):
        for name, value in stage.state_dict().items():
            assert torch.equal(value, model_state[name]), name
    assert not torch.equal(model_state["blocks.0.attn.wq.weight"], other["blocks.0.attn.wq.weight"])


def test_state_dicts_move_model_to_stages_and_back():
    cfg = _cfg("resbm", "postnorm", 3)
    state = _perturbed_model(cfg).state_dict()
    parts = [stage_state_dict(state, cfg, s) for s in range(3)]
    assert set(parts[0]) & set(parts[1]) == set()
    assert "boundaries.0.encoder.proj.weight" in parts[0]
    assert "boundaries.0.decoder.proj.weight" in parts[1]
    assert "boundaries.0.decoder.embed.weight" in parts[1] and "boundaries.1.decoder.embed.weight" in parts[2]
    assert "embed.weight" in parts[0] and "head.weight" in parts[2]
    merged = merge_stage_states(parts, cfg)
    assert sorted(merged) == sorted(state)
    assert all(torch.equal(merged[k], state[k]) for k in state)
    fresh = build_model(cfg, seed=0)
    fresh.load_state_dict(merged)  # strict
    with pytest.raises(KeyError, match="more than one stage|unexpected"):
        merge_stage_states([parts[0], parts[0], parts[2]], cfg)
    with pytest.raises(KeyError, match="lacks"):
        stage_state_dict({k: v for k, v in state.items() if k != "head.weight"}, cfg, 2)


def test_emitted_code_is_wire_exact_for_quantised_codecs():
    for codec_name in ("bf16", "fp8", "int8"):
        cfg = _cfg("resbm", "normed", 2, codec_name)
        stage0 = build_stages(cfg, seed=1, stages=[0])[0]
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
        code = stage0(tokens).detach()
        back = codec.decode(codec.encode(code, codec_name), cfg.code_shape(2), codec_name,
                            max_bytes=1 << 20)
        assert torch.equal(back, code), codec_name


def test_model_returns_logits_and_stage_rejects_bad_input():
    cfg = _cfg("naive", "normed", 2)
    model = build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_len))
    assert model(tokens).shape == (2, cfg.seq_len, cfg.vocab_size)
    stage0, stage1 = build_stages(cfg)
    with pytest.raises(ValueError, match="int64 token ids"):
        stage0(tokens.float())
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        stage1(torch.zeros(2, cfg.seq_len, 5), tokens=tokens)
    assert stage_param_names(cfg, 1)[-1] == "head.weight"


def test_iota_encoder_replaces_the_last_mlp_of_each_non_final_stage():
    cfg = _cfg("resbm-iota", "fused-mlp", 3)
    names = set(build_model(cfg).state_dict())
    assert "blocks.1.mlp.down.weight" not in names and "blocks.3.mlp.down.weight" not in names
    assert "blocks.0.mlp.down.weight" in names and "blocks.4.mlp.down.weight" in names
    assert build_model(cfg).state_dict()["boundaries.1.encoder.down.weight"].shape == (cfg.code_dim, 192)


@pytest.mark.parametrize("fields,needle", [
    (dict(d_model=60, n_heads=8), "n_heads"),
    (dict(n_layers=5, n_stages=2), "n_layers"),
    (dict(n_layers=4, n_stages=2, stage_layers=(3, 2)), "stage_layers"),
    (dict(bottleneck_ratio=24), "bottleneck_ratio"),
    (dict(bottleneck_ratio=16, bottleneck_dim=8), "bottleneck_dim"),
    (dict(bottleneck_ratio=None, bottleneck_dim=128), "bottleneck_dim"),
    (dict(boundary="bogus"), "boundary"),
    (dict(boundary="resbm", boundary_variant="fancy"), "boundary_variant"),
    (dict(wire_codec="int4"), "wire_codec"),
    (dict(token_reinject=1), "token_reinject"),
    (dict(seq_len=0), "seq_len"),
    (dict(init_std=-1.0), "init_std"),
])
def test_config_errors_name_the_field(fields, needle):
    base = dict(d_model=64, n_layers=4, n_heads=4, seq_len=16, n_stages=2, bottleneck_ratio=16)
    base.update(fields)
    with pytest.raises(ValueError, match=needle):
        ModelConfig(**base)


def test_config_round_trip_presets_and_unknown_keys():
    for name in ("tiny", "small", "bench"):
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        off = ModelConfig.preset(name, token_reinject=False)
        assert off.to_dict()["token_reinject"] is False and ModelConfig.from_dict(off.to_dict()) == off != cfg
    bench = ModelConfig.preset("bench")
    assert (bench.n_layers, bench.d_model, bench.n_heads, bench.seq_len, bench.n_stages) == (8, 1024, 16, 512, 4)
    assert bench.code_dim == 8 and bench.code_shape(2) == (2, 512, 8)
    assert ModelConfig.preset("tiny", boundary="none").code_dim == 64
    assert ModelConfig(d_model=512, n_heads=8, bottleneck_dim=4).bottleneck_width == 4
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("huge")


def test_flops_per_token_matches_parameter_count():
    for kind in ("none", "resbm", "resbm-iota"):
        cfg = _cfg(kind, BOUNDARY_VARIANTS[kind][0], 3)
        model = build_model(cfg)
        n_matmul = sum(p.numel() for n, p in model.named_parameters()
                       if p.ndim == 2 and "embed" not in n.split("."))  # lookups, re-injection's too
        assert cfg.matmul_params() == n_matmul
        assert cfg.flops_per_token() == 6 * n_matmul + 12 * cfg.n_layers * cfg.d_model * cfg.seq_len
