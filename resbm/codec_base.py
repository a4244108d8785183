"""`TensorCodec`: the one base of the codecs that put tensors on the wire.

A codec is a `spec.wire_format.WireFormat` (its name, the tensor roles it carries and the exact
size of any encoded tensor, all torch-free so the bridge can size grants) plus the tensor side:
`encode` (a float tensor to bytes, refusing NaN/Inf), `decode` (bytes to a float32 tensor,
verifying every byte, raising a `CodecError` subclass or the codec's own error type on anything
else) and `roundtrip` (what the wire does to a tensor, on its own device).

The two families:

| codec | roles | tensors | module |
|---|---|---|---|
| `ActivationCodec(name)` | activation, activation_grad | a micro-batch's boundary code (B, T, k) and its gradient | `resbm.codec` |
| `BlockCodec(name, block)` | pseudo_gradient, merged_update | one shard of a stage's flat parameter delta | `resbm.sync_codec` |

A run decides which format carries each role (`protocol.run_config.RunConfig.wire_format`);
`resbm.codecs.tensor_codec(format)` gives the codec that implements a format on tensors.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from spec.wire_format import CodecError, TensorRole, WireFormat

__all__ = ["CodecError", "TensorCodec", "TensorRole"]


class TensorCodec(WireFormat):
    """A wire format that also encodes and decodes tensors."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> bytes:
        """The canonical bytes of float tensor `x` (NaN or Inf refused)."""

    @abstractmethod
    def decode(self, data: bytes | bytearray | memoryview, shape: Sequence[int] | int,
               max_bytes: int | None = None) -> torch.Tensor:
        """The float32 tensor of `shape` that `data` encodes; refused unless every byte checks out."""

    @abstractmethod
    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x)) computed on x's device (float32): what the wire does to `x`."""

