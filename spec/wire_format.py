"""The base every tensor codec stands on: its name, the roles of the tensors it carries, and the
exact byte size of any encoded tensor, all without torch.

Two codec families share it. The activation codec (`spec.activation_format`, implemented on
tensors by `resbm.codec`) carries a stage's boundary code forward and its gradient back. The block
codec (`spec.block_format`, implemented by `resbm.sync_codec`) carries a replica's pseudo-gradient
pieces and the merged updates of the sharded sync. The bridge sizes every grant with `size`
before the tensor exists; `resbm.codec_base.TensorCodec` adds encode and decode on tensors.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

__all__ = ["TensorRole", "CodecError", "WireFormat"]


class TensorRole(str, enum.Enum):
    """What a tensor on the wire is, which decides its codec (`protocol.run_config.wire_format`)."""

    ACTIVATION = "activation"              # a boundary code, stage s -> stage s + 1
    ACTIVATION_GRAD = "activation_grad"    # the gradient of that code, stage s + 1 -> stage s
    PSEUDO_GRADIENT = "pseudo_gradient"    # one shard of a replica's round delta (the sync's upload)
    MERGED_UPDATE = "merged_update"        # one shard's merged parameter delta (after its clip reference)


class CodecError(ValueError):
    """Base class of every refusal by a codec: bytes or a tensor that are not what was expected."""


class WireFormat(ABC):
    """A codec's byte layout: `name`, the `roles` it carries, and `size` (exact, for any tensor of a shape)."""

    name: str
    roles: ClassVar[frozenset[TensorRole]] = frozenset()

    @abstractmethod
    def size(self, shape: Sequence[int] | int) -> int:
        """The exact byte length of any tensor of `shape` (or of `shape` values) once encoded."""

    def carries(self, role: TensorRole) -> bool:
        """True when this codec is made for tensors of `role`."""
        return role in self.roles
