"""Every parameter of a pipeline stage, by state-dict name and shape, from the model config alone.

The bridge sizes the sharded sync's objects from these shapes (a stage's parameter count decides
its shard layout) without building the model, so it never imports torch. The table follows
`resbm.stages.Stage`'s modules name for name and in state-dict order; `tests/test_stage_shapes.py`
holds the two equal for every boundary kind and variant, token re-injection rank and stage split.
"""
from __future__ import annotations

import math

from spec.model_config import ModelConfig

__all__ = ["block_has_mlp", "stage_param_shapes", "stage_param_count"]

Shapes = dict[str, tuple[int, ...]]


def block_has_mlp(cfg: ModelConfig, layer: int) -> bool:
    """False for the last block of a non-final stage under resbm-iota (its MLP is the encoder)."""
    if cfg.boundary != "resbm-iota":
        return True
    ends = {cfg.stage_layer_range(s)[-1] for s in range(cfg.n_stages - 1)}
    return layer not in ends


def _block(cfg: ModelConfig, layer: int) -> Shapes:
    d, h = cfg.d_model, cfg.mlp_hidden
    out: Shapes = {"attn_norm.weight": (d,)}
    out.update({f"attn.{w}.weight": (d, d) for w in ("wq", "wk", "wv", "wo")})
    if block_has_mlp(cfg, layer):
        out.update({"mlp_norm.weight": (d,), "mlp.gate.weight": (h, d), "mlp.up.weight": (h, d),
                    "mlp.down.weight": (d, h)})
    return out


def _encoder(cfg: ModelConfig) -> Shapes:
    d, k, kind = cfg.d_model, cfg.code_dim, cfg.boundary
    if kind == "none":
        return {}
    if kind == "resbm-iota":
        h = cfg.mlp_hidden
        return {"norm.weight": (d,), "gate.weight": (h, d), "up.weight": (h, d), "down.weight": (k, h)}
    normed = kind == "naive" or cfg.boundary_variant != "literal"
    return {**({"norm.weight": (d,)} if normed else {}), "proj.weight": (k, d)}


def _decoder(cfg: ModelConfig) -> Shapes:
    d, k, v, kind = cfg.d_model, cfg.code_dim, cfg.vocab_size, cfg.boundary
    out: Shapes = {}
    if kind != "none":
        out["proj.weight"] = (d, k)
    if kind == "resbm" and cfg.boundary_variant in ("postnorm", "postnorm-fused"):
        out["norm.weight"] = (d,)
    if cfg.token_reinject:
        r = cfg.reinject_rank
        # a factored table's own parameter `up` comes before its child `table` in a state dict
        out.update({"embed.up": (d, r), "embed.table.weight": (v, r)} if r else {"embed.weight": (v, d)})
    return out


def stage_param_shapes(cfg: ModelConfig, stage: int) -> Shapes:
    """{state-dict key: shape} of `stage`, in state-dict order."""
    if not 0 <= stage < cfg.n_stages:
        raise ValueError(f"stage index must be in 0..{cfg.n_stages - 1}, got {stage}")
    first, last = stage == 0, stage == cfg.n_stages - 1
    out: Shapes = {"embed.weight": (cfg.vocab_size, cfg.d_model)} if first else {}
    if not first:
        out.update({f"boundaries.{stage - 1}.decoder.{n}": s for n, s in _decoder(cfg).items()})
    if not last:
        out.update({f"boundaries.{stage}.encoder.{n}": s for n, s in _encoder(cfg).items()})
    for layer in cfg.stage_layer_range(stage):
        out.update({f"blocks.{layer}.{n}": s for n, s in _block(cfg, layer).items()})
    if last:
        out.update({"norm.weight": (cfg.d_model,), "head.weight": (cfg.vocab_size, cfg.d_model)})
    return out


def stage_param_count(cfg: ModelConfig, stage: int) -> int:
    """Number of parameter values in `stage` (the length of its flat sync vector)."""
    return sum(math.prod(shape) for shape in stage_param_shapes(cfg, stage).values())
