"""Which tensor codec implements a wire format: the activation codec or the sync's block codec
(both `resbm.codec_base.TensorCodec`s; this factory sits above them so the base imports neither)."""
from __future__ import annotations

from spec.activation_format import ActivationFormat
from spec.block_format import BlockFormat
from spec.wire_format import CodecError, WireFormat

from resbm.codec import ActivationCodec
from resbm.codec_base import TensorCodec
from resbm.sync_codec import BlockCodec

__all__ = ["tensor_codec"]


def tensor_codec(fmt: WireFormat) -> TensorCodec:
    """The codec that encodes and decodes tensors in wire format `fmt`."""
    if isinstance(fmt, TensorCodec):
        return fmt
    if isinstance(fmt, ActivationFormat):
        return ActivationCodec(fmt.name)
    if isinstance(fmt, BlockFormat):
        return BlockCodec(fmt.name, fmt.block)
    raise CodecError(f"no tensor codec implements {type(fmt).__name__}")
