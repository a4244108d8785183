"""What every object of a sharded run's sync must be: the exact byte size of each stage's
pseudo-gradient piece and merged update, shard by shard (from the run's model config, its shard
count, block and codecs; pure: the bridge computes it once at start-up and ties every grant and
report to it, so no peer stores a byte more than the honest object holds).

resbm (and with it torch) is imported on first use, as in bridge.codespec: the stage shapes come
from the model built on the meta device (no memory), the sizes from resbm.sync_codec's exact
encoded size, which is checked against a real encode first."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from protocol.messages import RunConfig

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
    if run.sync_mode != "sharded":
        return None
    from resbm.config import ModelConfig
    from resbm.shards import layout
    from resbm.stages import stage_param_shapes
    from resbm.sync_codec import Codec, check_sizes, encoded_size
    from resbm.sync_state import update_size
    try:
        cfg = ModelConfig.from_dict(dict(run.model))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config 'model' is not a valid model config: {exc}") from None
    check_sizes()
    pg, merged = Codec(run.sync_codec, run.sync_block), Codec(run.sync_merged_codec, run.sync_block)
    pieces, updates = [], []
    for stage in range(run.n_stages):
        lay = layout(stage_param_shapes(cfg, stage), run.sync_shards, run.sync_block)
        if len(lay) != run.sync_shards:
            raise ValueError(f"sync_shards={run.sync_shards} is more than stage {stage}'s {lay.total} values "
                             f"allow ({len(lay)} shards of {run.sync_block}-value blocks): lower sync_shards")
        pieces.append(tuple(encoded_size(b - a, pg) for a, b in lay))
        updates.append(tuple(update_size(b - a, merged) for a, b in lay))
    return SyncSpec(pieces=tuple(pieces), updates=tuple(updates))
