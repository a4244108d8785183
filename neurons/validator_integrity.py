"""The validator's integrity duties beside audits: recompute every merge of a closed round,
settle the bridge's disputes, and report failed verdicts so the bridge quarantines cheaters."""
from __future__ import annotations

import logging

from protocol.bridge_client import BridgeClient
from protocol.client import BridgeError
from protocol.integrity import Arbitration, Verdict, VerdictReport
from protocol.messages import HopLog, RunConfig
from neurons.merge_check import judge_merge, recompute_stage
from neurons.transfer import ObjectTransfer, TransferError
from resbm.outer import OuterError

__all__ = ["check_round_merges", "settle_disputes", "report_verdicts"]

log = logging.getLogger("validator")


def check_round_merges(transfer: ObjectTransfer, run: RunConfig, hoplog: HopLog) -> dict[str, str]:
    """{hotkey: reason} of every replica a recomputation of the round's merges fails."""
    failed: dict[str, str] = {}
    stages = sorted({p.stage for p in hoplog.pseudograds} | {v.stage for v in hoplog.votes})
    for stage in stages:
        items = [p for p in hoplog.pseudograds if p.stage == stage]
        votes = {v.hotkey: v.sha256 for v in hoplog.votes if v.stage == stage}
        start = next((s for s in hoplog.states if s.stage == stage), None)
        if not items:
            continue
        try:
            outcome = recompute_stage(transfer, run, stage, start, items)
        except (TransferError, OuterError) as exc:
            log.warning("round %d stage %d: merge not recomputed (%s); nobody judged", hoplog.round,
                        stage, exc)
            continue
        except Exception:  # a peer's input we did not foresee must not end the validator's thread
            log.exception("round %d stage %d: merge check failed; nobody judged", hoplog.round, stage)
            continue
        v = judge_merge(outcome, votes)
        log.info("round %d stage %d: merge recomputed (%s..), %d vote(s) agree, %d fail", hoplog.round,
                 stage, v.sha[:10], len(v.agreed), len(v.failed))
        failed.update(v.failed)
    return failed


def settle_disputes(client: BridgeClient, transfer: ObjectTransfer, run: RunConfig,
                    settled: set) -> int:
    """Recompute every open dispute of a whole-state run once and post the result; returns how
    many were settled (a sharded run's: neurons.shard_validate.settle_sharded)."""
    n = 0
    for d in client.disputes().disputes:
        if (d.round, d.stage) in settled:
            continue
        try:
            outcome = recompute_stage(transfer, run, d.stage, d.start, d.items)
        except (TransferError, OuterError) as exc:
            log.warning("dispute round %d stage %d: cannot recompute (%s)", d.round, d.stage, exc)
            continue
        except Exception:  # one dispute's inputs must never end the validator's thread
            log.exception("dispute round %d stage %d: recomputation failed", d.round, d.stage)
            continue
        try:
            ack = client.arbitrate(Arbitration(round=d.round, stage=d.stage, sha256=outcome.sha))
        except BridgeError as exc:
            if exc.status != 409:  # settled meanwhile (another validator, or a deadline)
                raise
            ack = None
        settled.add((d.round, d.stage))
        n += 1
        log.warning("dispute round %d stage %d settled: recomputed %s.., %s", d.round, d.stage,
                    outcome.sha[:10], "a voter agreed" if ack and ack.agreed else "no voter agreed")
    return n


def report_verdicts(client: BridgeClient, rnd: int, failed: dict[str, str]) -> dict[str, int]:
    """Tell the bridge which miners failed in round `rnd` (it quarantines them)."""
    if not failed:
        return {}
    rep = VerdictReport(round=rnd, verdicts=[Verdict(hotkey=h, passed=False, reason=r[:500])
                                             for h, r in sorted(failed.items())])
    return client.verdicts(rep).quarantined
