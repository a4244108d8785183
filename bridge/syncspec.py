"""What every object of a sharded run's sync must be: the exact byte size of each stage's
pseudo-gradient piece and merged update, shard by shard (from the run's model config, its shard
count, block and codecs; pure: the bridge computes it once at start-up and ties every grant and
report to it, so no peer stores a byte more than the honest object holds).

Torch-free: the stage shapes come from `spec.stage_shapes` (the table `resbm.stages.Stage` is held
to), the sizes from `spec.block_format` (every `resbm.sync_codec.encode` checks its length against
it, so a replica never uploads an object of another size)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from protocol.messages import RunConfig
from spec.block_format import merged_update_size
from spec.shard_layout import layout
from spec.stage_shapes import stage_param_shapes
from spec.wire_format import TensorRole

__all__ = ["SyncSpec", "sync_spec"]


@dataclass(frozen=True)
class SyncSpec:
    """Exact sizes per stage and shard: `pieces[stage][shard]` (a pseudo-gradient piece in
    sync_codec) and `updates[stage][shard]` (a merged update: clip reference + sync_merged_codec)."""

    pieces: tuple[tuple[int, ...], ...]
    updates: tuple[tuple[int, ...], ...]


def sync_spec(run: RunConfig) -> Optional[SyncSpec]:
    """The run's SyncSpec (None unless `sync_mode: sharded`); ValueError, one line naming the
    field, when a stage is too small for `sync_shards` shards of `sync_block` values."""
    if not run.sharded:
        return None
    cfg = run.parsed_model()
    pg, merged = run.wire_format(TensorRole.PSEUDO_GRADIENT), run.wire_format(TensorRole.MERGED_UPDATE)
    pieces, updates = [], []
    for stage in range(run.n_stages):
        lay = layout(stage_param_shapes(cfg, stage), run.sync_shards, run.sync_block)
        if len(lay) != run.sync_shards:
            raise ValueError(f"sync_shards={run.sync_shards} is more than stage {stage}'s {lay.total} values "
                             f"allow ({len(lay)} shards of {run.sync_block}-value blocks): lower sync_shards")
        pieces.append(tuple(pg.size(b - a) for a, b in lay))
        updates.append(tuple(merged_update_size(b - a, merged) for a, b in lay))
    return SyncSpec(pieces=tuple(pieces), updates=tuple(updates))
