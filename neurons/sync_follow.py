"""Following a stage under the sharded sync: the state a round starts from, rebuilt from the
last full checkpoint plus the decided merged updates since (what a joiner, a restarted miner and
a validator's audit all need), and the bridge's view of a round, fetched.

The outer step is deterministic and element-wise, so replaying the same decided updates from the
same checkpoint reaches the bytes the replicas that lived through those rounds hold.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from protocol.client import BridgeError
from protocol.keys import PieceKey
from protocol.messages import StageRound
from protocol.routes import route
from protocol.sync_api import SyncView, UpdateRef
from resbm.shard_merge import apply_shard, zero_momentum
from resbm.shards import ShardLayout
from resbm.sync_state import load_checkpoint
from neurons.copies import first_good_copy
from neurons.shard_sync import SyncSettings, read_update
from neurons.transfer import ObjectTransfer, TransferError

__all__ = ["GONE", "SyncStart", "get_view", "wait_view", "fetch_update", "view_urls", "start_of_round", "advance", "state_sha"]

log = logging.getLogger("sync")


@dataclass
class SyncStart:
    """A stage's outer state at the start of `round`: weights, momentum, clip reference per shard."""

    round: int
    theta: dict[str, torch.Tensor]
    momentum: dict[str, torch.Tensor]
    refs: list[float | None]
    checkpoint_sha: str | None


def get_view(client, rnd: int, stage: int) -> SyncView:
    """GET the bridge's view of (round, stage) under the sharded sync (`client`: a BridgeClient)."""
    return client.call(route("sync_view"), StageRound(round=rnd, stage=stage))


def view_urls(view: SyncView, run_id: str) -> dict[str, str]:
    """{final key: GET URL} of a view's pieces and decided updates (what a Board reads by key)."""
    urls = {PieceKey(run_id, view.round, view.stage, p.hotkey, s, sha).final: url
            for p in view.pieces for s, (sha, url) in enumerate(zip(p.shas, p.urls))}
    urls.update({u.key: u.url for u in view.decided if u is not None})
    return urls


def fetch_update(transfer: ObjectTransfer, ref: UpdateRef, rng: tuple[int, int],
                 cfg: SyncSettings, what: str, device: torch.device | str = "cpu") -> tuple[float, torch.Tensor]:
    """(clip reference, vector on `device`) of a decided update, from any agreeing merger's copy."""
    return read_update(transfer, [ref.url, *ref.alt_urls], ref.sha256, rng[1] - rng[0], cfg.merged, what, device)


def advance(transfer: ObjectTransfer, state: SyncStart, lay: ShardLayout, cfg: SyncSettings,
            shards: Sequence[UpdateRef | None], rnd: int, device: torch.device | str = "cpu") -> None:
    """Apply round `rnd`'s decided update to `state` in place (state.round becomes rnd + 1); the
    arithmetic runs on `device` (the state stays where it is)."""
    dev = torch.device(device)
    home = {n: t.device for n, t in state.theta.items()}
    theta = {n: t.to(dev) for n, t in state.theta.items()}
    momentum = {n: t.to(dev) for n, t in state.momentum.items()}
    for s, (rng, ref) in enumerate(zip(lay, shards)):
        if ref is None:
            continue
        r, vec = fetch_update(transfer, ref, rng, cfg, f"round {rnd} shard {s} update", dev)
        apply_shard(theta, momentum, rng, vec, cfg.params)
        state.refs[s] = r
    state.theta = {n: t.to(home[n]) for n, t in theta.items()}
    state.momentum = {n: t.to(home[n]) for n, t in momentum.items()}
    state.round = rnd + 1


def start_of_round(transfer: ObjectTransfer, view: SyncView, shapes: Mapping[str, Sequence[int]],
                   lay: ShardLayout, cfg: SyncSettings, max_bytes: int,
                   init_theta: Callable[[], Mapping[str, torch.Tensor]],
                   through: int | None = None, device: torch.device | str = "cpu") -> SyncStart:
    """The state round `view.round` starts from (or, with `through`, the one after round
    `through`'s update when the view is of that round and complete): the checkpoint plus every
    decided update since."""
    if view.checkpoint is None:
        theta = {n: t.detach().to("cpu", torch.float32).clone() for n, t in init_theta().items()}
        st = SyncStart(view.checkpoint_round, theta, zero_momentum(theta), [None] * len(lay), None)
    else:
        blob = _checkpoint_blob(transfer, view, max_bytes)
        theta, momentum, refs = load_checkpoint(blob, shapes, len(lay), max_bytes)
        st = SyncStart(view.checkpoint_round, theta, momentum, refs, view.checkpoint.sha256)
    for upd in view.updates:
        advance(transfer, st, lay, cfg, upd.shards, upd.round, device)
    if st.round != view.round:
        raise TransferError(f"catch-up reached round {st.round}, not {view.round}: updates missing")
    if through is not None and through == view.round and view.complete:
        advance(transfer, st, lay, cfg, view.decided, view.round, device)
    return st


def _checkpoint_blob(transfer: ObjectTransfer, view: SyncView, max_bytes: int) -> bytes:
    ck = view.checkpoint
    return first_good_copy([ck.url, *ck.alt_urls], lambda url: transfer.get_verified(url, ck.sha256, max_bytes,
                                                                                     "checkpoint"),
                           f"checkpoint {ck.sha256[:10]}..")


GONE = ("updates_pruned", "not_kept", "not_sharded")  # the view of that round will never come


def wait_view(client, rnd: int, stage: int, ready: Callable[[SyncView], bool],
              stop, poll: float = 0.2) -> SyncView | None:
    """Poll the view until `ready(view)`; None when `stop` is set first, or when the round is
    no longer kept (we fell behind past the bridge's update log: catch up from the latest
    checkpoint instead of asking for it until the run ends)."""
    while not stop.is_set():
        try:
            v = get_view(client, rnd, stage)
            if ready(v):
                return v
        except BridgeError as exc:
            if exc.status != 409:
                raise
            if exc.code in GONE:
                log.warning("round %d stage %d is no longer kept (%s): catching up from the latest checkpoint",
                            rnd, stage, exc.code)
                return None
        stop.wait(poll)
    return None


def state_sha(theta: Mapping[str, torch.Tensor]) -> str:
    """A short fingerprint of weights for logs (sha256 of their bytes in sorted-name order)."""
    h = hashlib.sha256()
    for n in sorted(theta):
        h.update(theta[n].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
