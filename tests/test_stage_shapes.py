"""spec.stage_shapes (the torch-free table the bridge sizes sync objects from) equals the state dict
of every resbm Stage, name for name, shape for shape and in order, over every boundary kind and
variant, token re-injection setting and stage split."""
from __future__ import annotations

import math

import pytest
import torch

from resbm.config import BOUNDARY_VARIANTS, ModelConfig
from resbm.stages import Stage
from spec.stage_shapes import stage_param_count, stage_param_shapes

VARIANTS = [(kind, variant) for kind, variants in BOUNDARY_VARIANTS.items() for variant in variants]
REINJECT = [(False, None), (True, 0), (True, 8)]  # off, full table, factored at rank 8
SPLITS = [dict(n_layers=4, n_stages=2), dict(n_layers=5, n_stages=3, stage_layers=(1, 3, 1)),
          dict(n_layers=2, n_stages=1)]


def _cfg(kind: str, variant: str, reinject: bool, rank: int | None, split: dict) -> ModelConfig:
    return ModelConfig(vocab_size=96, d_model=32, n_heads=4, seq_len=16, bottleneck_ratio=8, boundary=kind,
                       boundary_variant=variant, token_reinject=reinject, token_reinject_rank=rank, **split)


@pytest.mark.parametrize("split", SPLITS, ids=["even", "uneven3", "one-stage"])
@pytest.mark.parametrize("reinject,rank", REINJECT, ids=["no-reinject", "full-table", "rank8"])
@pytest.mark.parametrize("kind,variant", VARIANTS, ids=[f"{k}-{v}" for k, v in VARIANTS])
def test_shape_table_equals_every_stage_state_dict(kind, variant, reinject, rank, split):
    cfg = _cfg(kind, variant, reinject, rank, split)
    for s in range(cfg.n_stages):
        with torch.device("meta"):
            stage = Stage(cfg, s)
        have = [(name, tuple(t.shape)) for name, t in stage.state_dict().items()]
        assert have == list(stage_param_shapes(cfg, s).items()), (cfg, s)
        assert stage_param_count(cfg, s) == sum(math.prod(shape) for _, shape in have)


def test_stage_counts_add_up_to_the_model():
    cfg = _cfg("resbm", "postnorm", True, 0, SPLITS[1])
    per_stage = [stage_param_count(cfg, s) for s in range(cfg.n_stages)]
    assert all(n > 0 for n in per_stage) and len(set(per_stage)) > 1  # the uneven split shows in the sizes


def test_a_stage_outside_the_pipeline_is_refused():
    cfg = _cfg("resbm", "postnorm", True, None, SPLITS[0])
    with pytest.raises(ValueError, match="stage index must be in 0..1"):
        stage_param_shapes(cfg, 2)
