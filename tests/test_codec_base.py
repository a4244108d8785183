"""One codec base under both families: the codec a run names for each tensor role encodes to
exactly the size its torch-free format states, decodes back to what `roundtrip` says, carries
only its roles, and refuses NaN with a CodecError (the base class of every codec refusal)."""
from __future__ import annotations

import pytest
import torch

from protocol.run_config import RunConfig
from resbm.codec_base import CodecError, TensorCodec, TensorRole
from resbm.codecs import tensor_codec
from tests.servers import tiny_run_config

RUN = RunConfig(**tiny_run_config(sync_mode="sharded", sync_shards=2, sync_codec="int4", sync_block=64))
SHAPES = {TensorRole.ACTIVATION: (2, 8, 4), TensorRole.ACTIVATION_GRAD: (2, 8, 4),
          TensorRole.PSEUDO_GRADIENT: (300,), TensorRole.MERGED_UPDATE: (300,)}


@pytest.mark.parametrize("role", list(TensorRole), ids=[r.value for r in TensorRole])
def test_the_runs_codec_for_each_role_keeps_its_stated_size_and_roundtrip(role):
    fmt = RUN.wire_format(role)
    codec = tensor_codec(fmt)
    assert isinstance(codec, TensorCodec) and codec.name == fmt.name and codec.carries(role)
    x = torch.randn(SHAPES[role], generator=torch.Generator().manual_seed(1))
    blob = codec.encode(x)
    assert len(blob) == fmt.size(SHAPES[role])
    assert torch.equal(codec.decode(blob, SHAPES[role]), codec.roundtrip(x))
    with pytest.raises(CodecError):
        codec.encode(torch.full(SHAPES[role], float("nan")))


def test_activation_and_block_codecs_carry_disjoint_roles():
    act, block = (tensor_codec(RUN.wire_format(r)) for r in (TensorRole.ACTIVATION, TensorRole.PSEUDO_GRADIENT))
    assert act.roles.isdisjoint(block.roles) and act.roles | block.roles == set(TensorRole)
    assert tensor_codec(act) is act  # a tensor codec is its own implementation
