"""The validator's duties under the sharded sync: recompute every shard's merge of a closed round
and judge its mergers, settle disputed shards and disputed checkpoints, and give audits the
round's start state and a miner's decoded pseudo-gradient.

Everything starts from the bridge's view of the round (protocol.sync_api.SyncView): the last
checkpoint and the decided updates since rebuild the round's start state and each shard's clip
reference, exactly as the replicas hold them; a shard's recomputation is then the mergers' own
code (neurons.shard_check) without the upload. A validator keeps each stage's last rebuilt start
(`RoundStarts`): the next round's is that one plus its decided update, with no checkpoint to
download, and the arithmetic runs on its GPU when that reproduces the CPU's bits
(neurons/sync_device.py).
"""
from __future__ import annotations

import hashlib
import logging

import torch

from protocol.client import BridgeError
from protocol.integrity import Arbitration
from protocol.messages import HopLog, RunConfig
from protocol.routes import route
from protocol.sync_api import ShardArbitration, SyncView
from resbm.outer import OuterError, StateError
from resbm.sync_codec import decode, encoded_size
from resbm.sync_state import checkpoint_bytes
from neurons.round_audit import ClaimError
from neurons.shard_check import judge_shard, recompute_shard
from neurons.shard_sync import Piece, ReplicaSync, sync_settings
from neurons.stage_worker import worker_for_run
from neurons.sync_follow import SyncStart, advance, get_view, start_of_round, view_urls
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["round_start", "RoundStarts", "check_sharded_round", "settle_sharded", "sharded_pseudo_gradient",
           "audit_inputs"]

log = logging.getLogger("validator")


class _ViewBoard:
    """GET URLs of a view's pieces, by final key (a validator uploads nothing)."""

    def __init__(self, view: SyncView, run_id: str):
        self.urls = view_urls(view, run_id)

    def put_url(self, key: str, size: int) -> str:
        raise TransferError("a validator uploads nothing")

    def get_url(self, key: str) -> str:
        return self.urls[key]


def round_start(client, transfer: ObjectTransfer, run: RunConfig, rnd: int, stage: int,
                through: int | None = None, device: torch.device | str = "cpu") -> tuple[SyncView, SyncStart]:
    """(view, state round `rnd` of `stage` starts from; or, with through=rnd, the one after it)."""
    view = get_view(client, rnd, stage)
    cfg = sync_settings(run)
    worker = worker_for_run(run, stage, "cpu")
    lay = cfg.layout(worker.param_shapes)
    return view, start_of_round(transfer, view, worker.param_shapes, lay, cfg, run.max_state_bytes,
                                worker.theta, through=through, device=device)


def _copy(start: SyncStart) -> SyncStart:
    return SyncStart(start.round, {n: t.clone() for n, t in start.theta.items()},
                     {n: t.clone() for n, t in start.momentum.items()}, list(start.refs), None)


def _same_update(view: SyncView, prev: SyncView) -> bool:
    """Whether round `view.round` starts from `prev`'s round plus `prev`'s decided update."""
    if not prev.complete or view.round != prev.round + 1:
        return False
    if view.checkpoint_round == view.round:  # a checkpoint of that very update
        return not view.updates
    last = view.updates[-1] if view.updates else None
    if last is None or last.round != prev.round or len(last.shards) != len(prev.decided):
        return False
    return all((a is None and b is None) or (a is not None and b is not None and a.sha256 == b.sha256)
               for a, b in zip(last.shards, prev.decided))


class RoundStarts:
    """The round starts a validator rebuilt, one per stage (the latest): round r+1's is round r's
    plus its decided update when the bridge's log agrees, else the checkpoint plus the updates."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._last: dict[int, tuple[SyncView, SyncStart]] = {}
        self.rebuilt = self.advanced = 0

    def get(self, client, transfer: ObjectTransfer, run: RunConfig, rnd: int, stage: int) -> tuple[SyncView, SyncStart]:
        """(view, start) of round `rnd` of `stage`; don't modify the start's tensors."""
        view = get_view(client, rnd, stage)
        held = self._last.get(stage)
        if held is not None and held[1].round == rnd:
            return view, held[1]
        if held is not None and _same_update(view, held[0]):
            start = _copy(held[1])
            cfg = sync_settings(run)
            advance(transfer, start, cfg.layout({n: tuple(t.shape) for n, t in start.theta.items()}), cfg,
                    held[0].decided, held[0].round, self.device)
            self.advanced += 1
        else:
            start = round_start(client, transfer, run, rnd, stage, device=self.device)[1]
            self.rebuilt += 1
        self._last[stage] = (view, start)
        return view, start


def _recompute(transfer, run, view: SyncView, start: SyncStart, shard: int, device="cpu"):
    cfg = sync_settings(run)
    lay = cfg.layout({n: tuple(t.shape) for n, t in start.theta.items()})
    sync = ReplicaSync(transfer, _ViewBoard(view, run.run_id), cfg, run.run_id, "validator", view.stage,
                       device=device)
    pieces = [Piece(p.hotkey, p.samples, tuple(p.shas)) for p in view.pieces]
    return recompute_shard(sync, view.round, shard, lay[shard], pieces, start.refs[shard])


def _checkpoint_sha(transfer, run, view: SyncView, start: SyncStart, device="cpu") -> str:
    """sha256 of the checkpoint the round's decided update leads to from `start`."""
    cfg = sync_settings(run)
    after = _copy(start)
    advance(transfer, after, cfg.layout({n: tuple(t.shape) for n, t in after.theta.items()}), cfg,
            view.decided, view.round, device)
    return hashlib.sha256(checkpoint_bytes(after.theta, after.momentum, after.refs)).hexdigest()


def check_sharded_round(client, transfer: ObjectTransfer, run: RunConfig,
                        hoplog: HopLog, starts: RoundStarts | None = None) -> dict[str, str]:
    """{hotkey: reason} of every merger (or piece sender) a recomputation of the round fails."""
    failed: dict[str, str] = {}
    starts = starts or RoundStarts()
    for stage in sorted({p.stage for p in hoplog.pseudograds}):
        try:
            view, start = starts.get(client, transfer, run, hoplog.round, stage)
            for s, votes in enumerate(view.votes):
                v = judge_shard(_recompute(transfer, run, view, start, s, starts.device), votes)
                for hk, why in v.failed.items():
                    failed.setdefault(hk, f"shard {s}: {why}")
            cast = {v.hotkey: v.sha256 for v in hoplog.votes if v.stage == stage}
            if cast and view.complete:
                want = _checkpoint_sha(transfer, run, view, start, starts.device)
                for hk, sha in cast.items():
                    if sha != want:
                        failed.setdefault(hk, f"checkpoint {sha[:12]} differs from the recomputation {want[:12]}")
        except (TransferError, OuterError, BridgeError) as exc:
            log.warning("round %d stage %d: sharded merge not recomputed (%s); nobody judged",
                        hoplog.round, stage, exc)
            continue
        except Exception:  # a peer's input we did not foresee must not end the validator's thread
            log.exception("round %d stage %d: sharded merge check failed; nobody judged", hoplog.round, stage)
            continue
        log.info("round %d stage %d: %d shard(s) recomputed", hoplog.round, stage, len(view.votes))
    return failed


def settle_sharded(client, transfer: ObjectTransfer, run: RunConfig, settled: set) -> int:
    """Recompute every disputed shard and disputed checkpoint once and post the result."""
    n = 0
    for d in client.call(route("sync_disputes")).disputes:
        if (d.round, d.stage, d.shard) in settled:
            continue
        try:
            view, start = round_start(client, transfer, run, d.round, d.stage)
            sha = _recompute(transfer, run, view, start, d.shard).sha
            client.call(route("sync_arbitrate"), ShardArbitration(round=d.round, stage=d.stage, shard=d.shard,
                                                                  sha256=sha))
        except (TransferError, OuterError) as exc:
            log.warning("dispute round %d stage %d shard %d: cannot recompute (%s)", d.round, d.stage, d.shard, exc)
            continue
        except BridgeError as exc:
            if exc.status != 409:
                raise
        except Exception:  # never let one dispute's inputs end the validator's thread
            log.exception("dispute round %d stage %d shard %d: recomputation failed", d.round, d.stage, d.shard)
            continue
        settled.add((d.round, d.stage, d.shard))
        n += 1
        log.warning("disputed shard %d of round %d stage %d settled: %s..", d.shard, d.round, d.stage, sha[:10])
    for d in client.disputes().disputes:
        if (d.round, d.stage) in settled:
            continue
        try:
            view, start = round_start(client, transfer, run, d.round, d.stage)
            if not view.complete:
                continue
            sha = _checkpoint_sha(transfer, run, view, start)
            client.arbitrate(Arbitration(round=d.round, stage=d.stage, sha256=sha))
        except (TransferError, OuterError) as exc:
            log.warning("disputed checkpoint round %d stage %d: cannot recompute (%s)", d.round, d.stage, exc)
            continue
        except BridgeError as exc:
            if exc.status != 409:
                raise
        except Exception:
            log.exception("disputed checkpoint round %d stage %d: recomputation failed", d.round, d.stage)
            continue
        settled.add((d.round, d.stage))
        n += 1
    return n


def sharded_pseudo_gradient(transfer: ObjectTransfer, run: RunConfig, view: SyncView, hotkey: str,
                            shapes: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor] | None:
    """A miner's reported pseudo-gradient, decoded shard by shard (None: not in the set).
    Raises HashMismatch / OuterError for bytes that fail their sha256 or do not decode."""
    piece = next((p for p in view.pieces if p.hotkey == hotkey), None)
    if piece is None:
        return None
    cfg = sync_settings(run)
    lay = cfg.layout(shapes)
    if not len(piece.shas) == len(piece.urls) == len(lay):
        raise StateError(f"{hotkey} reported {len(piece.shas)} pieces, the stage has {len(lay)} shards")
    flat = torch.empty(lay.total, dtype=torch.float32)
    for s, ((a, b), sha, url) in enumerate(zip(lay, piece.shas, piece.urls)):
        try:
            blob = transfer.get_verified(url, sha, encoded_size(b - a, cfg.pg), f"shard {s} of {hotkey}")
        except TransferError as exc:
            if exc.status == 413:  # larger than the shard's exact size: a property of the object
                raise StateError(f"shard {s} of {hotkey}: {exc}") from None
            raise
        flat[a:b] = decode(blob, b - a, cfg.pg, device=device).cpu()
    out, off = {}, 0
    for n in sorted(shapes):
        k = int(torch.tensor(shapes[n]).prod()) if shapes[n] else 1
        out[n] = flat[off:off + k].reshape(shapes[n]).clone()
        off += k
    return out


def audit_inputs(client, transfer: ObjectTransfer, run: RunConfig, rnd: int, hotkey: str,
                 starts: RoundStarts | None = None):
    """For neurons.round_audit.audit_miner: worker -> (round start theta, claimed pseudo-gradient)."""
    def inputs(worker):
        got = starts or RoundStarts()
        view, start = got.get(client, transfer, run, rnd, worker.stage_index)
        try:
            pg = sharded_pseudo_gradient(transfer, run, view, hotkey, worker.param_shapes, got.device)
        except HashMismatch as exc:
            raise ClaimError(f"pseudo-gradient shard fails its hash: {exc}") from exc
        except OuterError as exc:
            raise ClaimError(f"pseudo-gradient shard does not decode: {exc}") from exc
        return start.theta, pg
    return inputs
