"""The sharded-sync tests' fixtures: a small stage's shapes and sync settings, seeded tensors, and
the bridge's S3 signer as a `Board`."""
from __future__ import annotations

import torch

from neurons.shard_sync import SyncSettings
from resbm.robust_merge import MergeParams
from resbm.sync_codec import Codec

__all__ = ["CFG", "SHAPES", "StorageBoard", "tensors"]

SHAPES = {"a.w": (64, 48), "b.b": (100,), "c.w": (30, 17)}
CFG = SyncSettings(Codec("int4", 64), Codec("int8", 64), shards=6, mergers=3, checkpoint_every=4,
                   params=MergeParams(outer_lr=0.7, outer_momentum=0.5))


class StorageBoard:
    """The bridge's signer (bridge.storage.Storage) as a Board."""

    def __init__(self, storage):
        self.s = storage

    def put_url(self, key: str, size: int) -> str:
        """A presigned PUT for `key` of `size` bytes."""
        return self.s.presign_put(key, size, 300)

    def get_url(self, key: str) -> str:
        """A presigned GET for `key`."""
        return self.s.presign_get(key, 300)


def tensors(seed: int, scale: float = 1.0):
    """Random named tensors of SHAPES (a pseudo-gradient or a state), seeded."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * scale for n, s in SHAPES.items()}
