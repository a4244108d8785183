"""The validator's side of the round's sync (every run's: a whole-state run is its one-shard case):
recompute every shard's merge of a closed round and judge its mergers and piece senders, settle
disputed shards and disputed checkpoints, give audits the round's start state and a miner's
decoded pseudo-gradient, and report failed verdicts so the bridge quarantines cheaters.

Everything starts from the bridge's view of the round (protocol.sync_api.SyncView): the last
checkpoint and the decided updates since rebuild the round's start state and each shard's clip
reference, exactly as the replicas hold them; a shard's recomputation is then the mergers' own
`ReplicaSync.merge_one` without the upload. The merge is deterministic, so only a voter whose
sha256 differs from the recomputation is failed, and a sender whose piece was unusable for a
property of the object itself (hash mismatch, undecodable, NaN, wrong size). Checking every shard
costs one full merge per stage and round; every lie a majority did not outvote is caught by a
dispute as well.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import torch

from protocol.client import BridgeError
from protocol.integrity import Arbitration, Verdict, VerdictReport
from protocol.messages import HopLog, RunConfig
from protocol.routes import route
from protocol.sync_api import ShardArbitration, SyncView
from resbm.outer import OuterError, StateError
from resbm.robust_merge import ZERO_UPDATE
from resbm.sync_codec import decode, encoded_size
from resbm.sync_state import checkpoint_bytes
from neurons.round_audit import ClaimError
from neurons.shard_sync import MergedShard, Piece, ReplicaSync, sync_settings
from neurons.stage_worker import worker_for_run
from neurons.sync_follow import SyncStart, advance, get_view, start_of_round, view_urls
from neurons.transfer import HashMismatch, ObjectTransfer, TransferError

__all__ = ["MergeVerdicts", "judge", "SyncCheck", "report_verdicts"]

log = logging.getLogger("validator")

_NOT_THE_SENDERS_FAULT = ("no verified samples", ZERO_UPDATE)  # the replay audit judges a lazy one


@dataclass
class MergeVerdicts:
    """What a recomputation says: the object it reached, and who failed with which reason."""

    sha: str
    failed: dict[str, str] = field(default_factory=dict)
    agreed: list[str] = field(default_factory=list)


def judge(outcome: MergedShard, votes: dict[str, str]) -> MergeVerdicts:
    """Fail voters whose sha256 differs from the recomputation and senders of unusable pieces."""
    v = MergeVerdicts(sha=outcome.sha)
    for hk, why in outcome.excluded.items():
        if not why.startswith(_NOT_THE_SENDERS_FAULT):
            v.failed[hk] = f"pseudo-gradient unusable: {why}"
    for hk, sha in sorted(votes.items()):
        if sha == outcome.sha:
            v.agreed.append(hk)
        elif hk not in v.failed:
            v.failed[hk] = f"merged update {sha[:12]} differs from the recomputation {outcome.sha[:12]}"
    return v


class _ViewBoard:
    """GET URLs of a view's objects, by final key (a validator uploads nothing)."""

    def __init__(self, view: SyncView, run_id: str):
        self.urls = view_urls(view, run_id)

    def put_url(self, key: str, size: int) -> str:
        raise TransferError("a validator uploads nothing")

    def get_url(self, key: str) -> str:
        return self.urls[key]


class SyncCheck:
    """A validator's checks of one run's sync."""

    def __init__(self, client, transfer: ObjectTransfer, run: RunConfig):
        self.client, self.transfer, self.run = client, transfer, run
        self.cfg = sync_settings(run)

    def round_start(self, rnd: int, stage: int, through: int | None = None) -> tuple[SyncView, SyncStart]:
        """(view, state round `rnd` of `stage` starts from; or, with through=rnd, the one after it)."""
        view = get_view(self.client, rnd, stage)
        worker = worker_for_run(self.run, stage, "cpu")
        lay = self.cfg.layout(worker.param_shapes)
        return view, start_of_round(self.transfer, view, worker.param_shapes, lay, self.cfg,
                                    self.run.max_state_bytes, worker.theta, through=through)

    def recompute(self, view: SyncView, start: SyncStart, shard: int) -> MergedShard:
        """The merged update of `shard` the frozen pieces must lead to (TransferError when objects are gone)."""
        lay = self.cfg.layout({n: tuple(t.shape) for n, t in start.theta.items()})
        sync = ReplicaSync(self.transfer, _ViewBoard(view, self.run.run_id), self.cfg, self.run.run_id,
                           "validator", view.stage)
        pieces = [Piece(p.hotkey, p.samples, tuple(p.shas)) for p in view.pieces]
        return sync.merge_one(view.round, shard, lay[shard], pieces, start.refs[shard], upload=False)

    def checkpoint_sha(self, view: SyncView, start: SyncStart) -> str:
        """sha256 of the checkpoint the round's decided update leads to from `start`."""
        after = SyncStart(start.round, {n: t.clone() for n, t in start.theta.items()},
                          {n: t.clone() for n, t in start.momentum.items()}, list(start.refs), None)
        advance(self.transfer, after, self.cfg.layout({n: tuple(t.shape) for n, t in after.theta.items()}), self.cfg,
                view.decided, view.round)
        return hashlib.sha256(checkpoint_bytes(after.theta, after.momentum, after.refs)).hexdigest()

    def check_round(self, hoplog: HopLog) -> dict[str, str]:
        """{hotkey: reason} of every merger, checkpoint voter or piece sender a recomputation of the
        round fails."""
        failed: dict[str, str] = {}
        for stage in sorted({p.stage for p in hoplog.pseudograds}):
            try:
                view, start = self.round_start(hoplog.round, stage)
                for s, votes in enumerate(view.votes):
                    for hk, why in judge(self.recompute(view, start, s), votes).failed.items():
                        failed.setdefault(hk, f"shard {s}: {why}")
                cast = {v.hotkey: v.sha256 for v in hoplog.votes if v.stage == stage}
                if cast and view.complete:
                    want = self.checkpoint_sha(view, start)
                    for hk, sha in cast.items():
                        if sha != want:
                            failed.setdefault(hk, f"checkpoint {sha[:12]} differs from the recomputation {want[:12]}")
            except (TransferError, OuterError, BridgeError) as exc:
                log.warning("round %d stage %d: merge not recomputed (%s); nobody judged", hoplog.round, stage, exc)
                continue
            except Exception:  # a peer's input we did not foresee must not end the validator's thread
                log.exception("round %d stage %d: merge check failed; nobody judged", hoplog.round, stage)
                continue
            log.info("round %d stage %d: %d shard(s) recomputed", hoplog.round, stage, len(view.votes))
        return failed

    def settle(self, settled: set) -> int:
        """Recompute every disputed shard and disputed checkpoint once and post the result."""
        n = 0
        for d in self.client.call(route("sync_disputes")).disputes:
            if (d.round, d.stage, d.shard) in settled:
                continue
            try:
                view, start = self.round_start(d.round, d.stage)
                sha = self.recompute(view, start, d.shard).sha
                self.client.call(route("sync_arbitrate"), ShardArbitration(round=d.round, stage=d.stage,
                                                                           shard=d.shard, sha256=sha))
            except (TransferError, OuterError) as exc:
                log.warning("dispute round %d stage %d shard %d: cannot recompute (%s)", d.round, d.stage, d.shard, exc)
                continue
            except BridgeError as exc:
                if exc.status != 409:  # settled meanwhile (another validator, or a deadline)
                    raise
            except Exception:  # never let one dispute's inputs end the validator's thread
                log.exception("dispute round %d stage %d shard %d: recomputation failed", d.round, d.stage, d.shard)
                continue
            settled.add((d.round, d.stage, d.shard))
            n += 1
            log.warning("disputed shard %d of round %d stage %d settled: %s..", d.shard, d.round, d.stage, sha[:10])
        for d in self.client.disputes().disputes:
            if (d.round, d.stage) in settled:
                continue
            try:
                view, start = self.round_start(d.round, d.stage)
                if not view.complete:
                    continue
                self.client.arbitrate(Arbitration(round=d.round, stage=d.stage, sha256=self.checkpoint_sha(view, start)))
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

    def pseudo_gradient(self, view: SyncView, hotkey: str, shapes: dict) -> dict[str, torch.Tensor] | None:
        """A miner's reported pseudo-gradient, decoded shard by shard (None: not in the set).
        Raises HashMismatch / OuterError for bytes that fail their sha256 or do not decode."""
        piece = next((p for p in view.pieces if p.hotkey == hotkey), None)
        if piece is None:
            return None
        lay = self.cfg.layout(shapes)
        if not len(piece.shas) == len(piece.urls) == len(lay):
            raise StateError(f"{hotkey} reported {len(piece.shas)} pieces, the stage has {len(lay)} shards")
        flat = torch.empty(lay.total, dtype=torch.float32)
        for s, ((a, b), sha, url) in enumerate(zip(lay, piece.shas, piece.urls)):
            try:
                blob = self.transfer.get_verified(url, sha, encoded_size(b - a, self.cfg.pg), f"shard {s} of {hotkey}")
            except TransferError as exc:
                if exc.status == 413:  # larger than the shard's exact size: a property of the object
                    raise StateError(f"shard {s} of {hotkey}: {exc}") from None
                raise
            flat[a:b] = decode(blob, b - a, self.cfg.pg)
        out, off = {}, 0
        for n in sorted(shapes):
            k = int(torch.tensor(shapes[n]).prod()) if shapes[n] else 1
            out[n] = flat[off:off + k].reshape(shapes[n]).clone()
            off += k
        return out

    def audit_inputs(self, rnd: int, hotkey: str):
        """For neurons.round_audit.audit_miner: worker -> (round start theta, claimed pseudo-gradient)."""
        def inputs(worker):
            view, start = self.round_start(rnd, worker.stage_index)
            try:
                pg = self.pseudo_gradient(view, hotkey, worker.param_shapes)
            except HashMismatch as exc:
                raise ClaimError(f"pseudo-gradient shard fails its hash: {exc}") from exc
            except OuterError as exc:
                raise ClaimError(f"pseudo-gradient shard does not decode: {exc}") from exc
            return start.theta, pg
        return inputs


def report_verdicts(client, rnd: int, failed: dict[str, str]) -> dict[str, int]:
    """Tell the bridge which miners failed in round `rnd` (it quarantines them)."""
    if not failed:
        return {}
    rep = VerdictReport(round=rnd, verdicts=[Verdict(hotkey=h, passed=False, reason=r[:500])
                                             for h, r in sorted(failed.items())])
    return client.verdicts(rep).quarantined
