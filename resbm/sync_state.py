"""Bytes of the sharded sync's merged updates and full checkpoints.

A merged update of one shard is its clip reference (fp32, little-endian) followed by the merged
vector in the run's merged-update codec (resbm.sync_codec); the sha256 of those bytes is the
merger's vote, so the strict majority that decides the vector also decides the shard's next clip
reference, and every replica, joiner and validator reads both from the same object.

A checkpoint is the replica's whole outer state every K rounds: `theta.<name>`, `momentum.<name>`
and `sync.refs` (one clip reference per shard, -1 for none yet), canonical safetensors like
resbm.outer's state bytes. References are fp32 everywhere, so one read from a checkpoint equals
one carried in memory.
"""
from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence

import torch

from resbm.outer import StateError, tensors_bytes, tensors_from_bytes
from resbm.sync_codec import Codec, decode, encode, encoded_size

__all__ = ["fp32", "pack_update", "unpack_update", "update_size", "checkpoint_bytes", "load_checkpoint"]

_REF = struct.Struct("<f")


def fp32(x: float | None) -> float | None:
    """`x` rounded to the nearest fp32 (None stays None)."""
    return None if x is None else _REF.unpack(_REF.pack(x))[0]


def pack_update(vec: torch.Tensor, ref: float, codec: Codec) -> bytes:
    """The bytes of a merged shard: fp32 clip reference, then the encoded vector."""
    return _REF.pack(ref) + encode(vec, codec)


def update_size(n: int, codec: Codec) -> int:
    """The exact length of pack_update for a shard of n values (the only size a merged update may have)."""
    return _REF.size + encoded_size(n, codec)


def unpack_update(blob: bytes, n: int, codec: Codec,
                  device: torch.device | str | None = None) -> tuple[float, torch.Tensor]:
    """(clip reference, decoded vector on `device`) of a merged shard; StateError on anything malformed."""
    if len(blob) <= _REF.size:
        raise StateError(f"merged update of {len(blob)} bytes is too short")
    (ref,) = _REF.unpack(blob[:_REF.size])
    if not (ref >= 0 and ref < float("inf")):
        raise StateError(f"merged update carries a bad clip reference {ref!r}")
    return ref, decode(blob[_REF.size:], n, codec, device=device)


def checkpoint_bytes(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor],
                     refs: Sequence[float | None]) -> bytes:
    """Canonical bytes of a full checkpoint (theta, momentum, per-shard clip references)."""
    flat = {f"theta.{n}": t for n, t in theta.items()}
    flat.update({f"momentum.{n}": t for n, t in momentum.items()})
    flat["sync.refs"] = torch.tensor([-1.0 if r is None else r for r in refs], dtype=torch.float32)
    return tensors_bytes(flat)


def load_checkpoint(blob: bytes, shapes: Mapping[str, Sequence[int]], n_shards: int, max_bytes: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float | None]]:
    """(theta, momentum, refs) of a checkpoint, checking names, shapes and finiteness."""
    expected = {f"theta.{n}": s for n, s in shapes.items()}
    expected.update({f"momentum.{n}": s for n, s in shapes.items()})
    expected["sync.refs"] = (n_shards,)
    d = tensors_from_bytes(blob, expected, max_bytes)
    refs = [None if float(r) < 0 else float(r) for r in d["sync.refs"]]
    return ({n: d[f"theta.{n}"] for n in shapes}, {n: d[f"momentum.{n}"] for n in shapes}, refs)
