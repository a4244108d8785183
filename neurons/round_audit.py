"""Turning a round's hop log into audit inputs: fetch and verify every object a miner touched.

A miner's claim is checked here before any replay: every object it reported must exist in the
store with the sha256 the bridge recorded, and no hop may be claimed twice. Replay then runs in
`neurons.audit.replay_round` from the round's published starting state.
"""
from __future__ import annotations

from collections import Counter

import torch

from protocol.lifecycle import HopKind
from protocol.messages import HopLog, HopRecord as WireRecord, RunConfig
from resbm import outer
from resbm.config import ModelConfig
from neurons.audit import HopRecord, ReplaySettings, replay_round, AuditReport
from neurons.audit_confirm import confirm_failure
from neurons.audit_tolerances import (AuditContext, device_gpu, record_gpu, record_numerics, replay_numerics,
                                      stage_tolerances, torch_dtype)
from neurons.objects import BadInput, fetch_code, fetch_inputs, fetch_state, fetch_tensors
from neurons.stage_worker import worker_for_run
from neurons.transfer import ObjectTransfer, TransferError

__all__ = ["ClaimError", "hop_counts", "check_claims", "audit_miner", "combine"]

_SEVERITY = ("passed", "uncalibrated", "inconclusive", "incomplete", "failed")


class ClaimError(Exception):
    """A miner's claims fail before replay (missing object, hash mismatch, duplicate claim)."""


def hop_counts(records: list[WireRecord]) -> dict[str, int]:
    """Hops per compute class for scoring (fwd, bwd, fwdbwd, bwd_recompute)."""
    c: Counter = Counter()
    for r in records:
        c["bwd_recompute" if (r.kind == HopKind.BWD and r.recompute) else r.kind] += 1
    return dict(c)


def check_claims(records: list[WireRecord]) -> None:
    """No hop id and no (sample, stage, kind) claimed twice by the miner in a round."""
    ids = Counter(r.hop_id for r in records)
    dup = [h for h, n in ids.items() if n > 1]
    if dup:
        raise ClaimError(f"hop {dup[0]} claimed {ids[dup[0]]} times")
    work = Counter((r.sample_id, r.stage, r.kind) for r in records)
    again = [w for w, n in work.items() if n > 1]
    if again:
        raise ClaimError(f"sample {again[0][0]} stage {again[0][1]} {again[0][2]} claimed {work[again[0]]} times")


def _to_audit_records(transfer: ObjectTransfer, records: list[WireRecord], shape, wire_codec: str) -> list[HopRecord]:
    out = []
    try:
        for r in sorted(records, key=lambda r: (r.inner_step, r.done_at)):
            inputs = fetch_inputs(transfer, r, shape, wire_codec)  # the objects the miner's hop read
            claimed = None if r.output is None else fetch_code(transfer, r.output, shape, wire_codec)
            out.append(HopRecord(sample_id=r.sample_id, kind=r.kind, inner_step=r.inner_step, recompute=r.recompute,
                                 inputs=inputs.act, grad=inputs.grad, claimed_output=claimed,
                                 claimed_loss=r.loss, hop_id=r.hop_id))
    except BadInput as exc:  # what a miner reports as a bad input is a failed claim here
        raise ClaimError(f"object {exc.detail} ({exc.reason})") from exc
    return out


def audit_miner(transfer: ObjectTransfer, run: RunConfig, log: HopLog, hotkey: str,
                device: str = "cpu", max_seconds: float = 60.0, inputs=None) -> AuditReport:
    """Replay `hotkey`'s round from public data; raises ClaimError for claims that fail outright.
    `inputs(worker) -> (theta_start, claimed pseudo-gradient)` replaces the whole-state reads.

    Each epoch replays in the numerics the miner declared when this validator's `device` allows
    (neurons.audit_tolerances), judged by the run's tolerances calibrated for what the replay is
    (model, numerics, GPUs, inner steps); a failure on numbers is replayed once more before it
    counts (neurons.audit_confirm)."""
    records = [r for r in log.records if r.miner_hotkey == hotkey]
    if not records:
        raise ClaimError("no hops to audit")
    check_claims(records)
    stage = records[0].stage
    if any(r.stage != stage for r in records):
        raise ClaimError("hops of one miner span several stages in one round")
    cfg = ModelConfig.from_dict(run.model)
    shape = tuple(cfg.code_shape(run.batch_size))
    worker = worker_for_run(run, stage, device)
    ref = next((s for s in log.states if s.stage == stage), None)
    item = next((p for p in log.pseudograds if p.hotkey == hotkey), None)
    pg = None
    if inputs is not None:  # the sharded sync: start state and pseudo-gradient come from its view
        theta, pg = inputs(worker)
    elif ref is None:
        theta = worker.theta()
    else:
        theta = fetch_state(transfer, ref, worker.param_shapes, run.max_state_bytes).theta
    if item is not None and inputs is None:
        try:
            pg = fetch_tensors(transfer, item.get_url, item.sha256, worker.param_shapes, run.max_state_bytes,
                               "pseudo-gradient")
        except TransferError as exc:
            raise ClaimError(f"pseudo-gradient cannot be read or fails its hash: {exc}") from exc
        except outer.OuterError as exc:
            raise ClaimError(f"pseudo-gradient does not decode: {exc}") from exc
    settings = ReplaySettings(round_index=log.round, inner_steps_per_round=run.inner_steps_per_round,
                              data_seed=run.data_seed, batch_size=run.batch_size, wire_codec=cfg.wire_codec,
                              dataset=run.dataset)
    # A miner that restarted mid-round (a new registration epoch) began again from the round's
    # state: each epoch is its own replay, and the pseudo-gradient belongs to the epoch that
    # reported it (one with no hops must report an all-zero pseudo-gradient over zero samples).
    pg_epoch = item.epoch if item is not None else None
    epochs = sorted({getattr(r, "epoch", 0) for r in records} | ({pg_epoch} if pg_epoch is not None else set()))
    model_hash = cfg.config_hash()
    reports: list[AuditReport] = []
    spent = 0.0
    for epoch in epochs:
        part = [r for r in records if getattr(r, "epoch", 0) == epoch]
        claimed = pg if epoch == pg_epoch else None
        if not part:
            if item.samples != 0 or any(bool(t.any()) for t in claimed.values()):
                raise ClaimError(f"epoch {epoch} did no hops but reported a pseudo-gradient over {item.samples} samples")
            continue
        try:
            declared, declared_gpu = record_numerics(part), record_gpu(part)
        except ValueError as exc:
            raise ClaimError(str(exc)) from exc
        replay_dev, replay_dtype = replay_numerics(declared, device)
        context = AuditContext(model=model_hash, miner=declared, miner_gpu=declared_gpu,
                               replay=(torch.device(replay_dev).type, replay_dtype), replay_gpu=device_gpu(replay_dev))
        tolerances = stage_tolerances(run.audit_tolerances, context, stage)
        audit_records = _to_audit_records(transfer, part, shape, cfg.wire_codec)
        same = worker.device == torch.device(replay_dev) and worker.dtype == torch_dtype(replay_dtype)
        replayer = worker if same else worker_for_run(run, stage, replay_dev, torch_dtype(replay_dtype))

        def replay(budget: float) -> AuditReport:
            return replay_round(lambda: replayer, theta, audit_records, settings, max_seconds=budget,
                                claimed_pseudo_grad=claimed, tolerances=tolerances)
        first = replay(max_seconds - spent)
        report = confirm_failure(first, lambda: replay(max_seconds - spent - first.seconds))
        spent += report.seconds
        reports.append(report)
        if report.status in ("failed", "incomplete"):
            break
    report = combine(reports)
    report.seconds = spent
    return report


def combine(reports: list[AuditReport]) -> AuditReport:
    """One miner-round's verdict from its epochs' replays: the most severe (failed > incomplete >
    inconclusive > uncalibrated > passed) speaks for all."""
    return max(reports, key=lambda r: _SEVERITY.index(r.status))
