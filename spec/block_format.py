"""The block codec's bytes: pseudo-gradient pieces and merged updates of the sharded sync (no torch).

A shard is a 1-D fp32 vector cut into blocks of `block` values; each block keeps one fp32 scale
and one `bits`-bit code per value (`resbm.sync_codec` encodes and decodes). A blob is safetensors
with fixed names, dtypes and shapes and no metadata, so its length depends on (n, codec) alone:
`BlockFormat.size` gives it exactly, and the bridge ties every sync grant to it.
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from spec.wire_format import TensorRole, WireFormat

__all__ = ["CODECS", "REF", "BlockFormat", "merged_update_size"]

CODECS = ("fp32", "int8", "int4", "int2")
REF = struct.Struct("<f")
"""A merged update starts with its shard's clip reference, one little-endian fp32 (resbm.sync_state)."""


@dataclass(frozen=True)
class BlockFormat(WireFormat):
    """A block codec: `name` in CODECS and the block length (values per fp32 scale)."""

    name: str = "int8"
    block: int = 256
    roles: ClassVar[frozenset[TensorRole]] = frozenset({TensorRole.PSEUDO_GRADIENT, TensorRole.MERGED_UPDATE})

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec {self.name!r} is not one of {', '.join(CODECS)}")
        if not (isinstance(self.block, int) and 8 <= self.block <= 1 << 20 and self.block % 8 == 0):
            raise ValueError(f"codec block {self.block!r} must be a multiple of 8 in [8, 2^20]")

    @property
    def bits(self) -> int:
        """Bits per value (32 for fp32)."""
        return 32 if self.name == "fp32" else int(self.name[3:])

    @property
    def qmax(self) -> int:
        """Largest code magnitude."""
        return (1 << (self.bits - 1)) - 1

    def size(self, shape: Sequence[int] | int) -> int:
        """The exact byte length of an encoded vector of `shape` values (an int, or a shape's product).

        8 bytes of header length, the safetensors JSON header (tensors ordered by dtype size, then
        name; padded with spaces to a multiple of 8), then the data; `resbm.sync_codec.check_sizes`
        compares this with a real encode."""
        n = shape if isinstance(shape, int) else math.prod(shape)
        if n < 1:
            raise ValueError(f"a shard has at least one value, got n={n}")
        entries = [("h", "I64", 3, 24)]
        if self.name == "fp32":
            entries.append(("x", "F32", n, 4 * n))
        else:
            nb, nq = max(1, math.ceil(n / self.block)), math.ceil(n * self.bits / 8)
            entries += [("s", "F32", nb, 4 * nb), ("q", "U8", nq, nq)]
        off, parts = 0, []
        for name, dtype, k, nbytes in entries:
            parts.append(f'"{name}":{{"dtype":"{dtype}","shape":[{k}],"data_offsets":[{off},{off + nbytes}]}}')
            off += nbytes
        header = len("{" + ",".join(parts) + "}")
        return 8 + header + (-header) % 8 + off


def merged_update_size(n: int, fmt: BlockFormat) -> int:
    """The exact length of a merged update of n values: the clip reference, then the encoded vector."""
    return REF.size + fmt.size(n)
