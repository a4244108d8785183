"""Replay audits: rebuild a miner's round from public data and compare what it uploaded.

The validator gets a miner's hop log for one round (inputs and outputs already decoded from the
object store), rebuilds a `StageWorker` at the round's starting weights, feeds the hops in the
miner's order, takes an inner step at every inner-step boundary exactly as the miner did, and
compares every output (codes, input gradients, losses) and optionally the pseudo-gradient.

Comparison per tensor: relative L2 error ||claimed - replay|| / ||replay||, cosine similarity
and norm ratio ||claimed|| / ||replay||. A hop passes when all three are within `Tolerances`.

`tolerances` is one `Tolerances`, a {kind: Tolerances} map, or a table with
`lookup(kind, inner_step) -> (Tolerances, calibrated)` (neurons.audit_tolerances.ToleranceTable:
the run config's calibrated `audit_tolerances` for what this replay is). A hop judged without a
calibrated tolerance is held only to `GROSS_TOLERANCES`; an audit that passes with such hops ends
`uncalibrated`, which penalises nobody. `DEFAULT_TOLERANCES` are the built-in calibration of CPU
miners replayed on a CPU. The honest and cheating spreads behind them: docs/BENCHMARKS.md,
"Replay audits".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from protocol.dataset import DatasetRef
from protocol.lifecycle import HopKind
from resbm import codec

from . import hop_exec
from .stage_worker import StageWorker, WorkerError

__all__ = [
    "AuditReport",
    "HopCheck",
    "HopRecord",
    "ReplaySettings",
    "Tolerances",
    "DEFAULT_TOLERANCES",
    "GROSS_TOLERANCES",
    "compare_tensors",
    "replay_round",
]

log = logging.getLogger(__name__)


@dataclass
class HopRecord:
    """One hop of a miner's round, as the validator reconstructs it from the hop log and objects."""

    sample_id: int
    kind: str
    """fwd | bwd | fwdbwd."""
    inner_step: int
    """Inner step (within the round) whose weights the miner used."""
    recompute: bool = False
    """bwd only: the miner recomputed the forward from `inputs` first."""
    inputs: torch.Tensor | None = None
    """Decoded input code (fwd, fwdbwd, recomputed bwd); None on stage 0 (tokens come from data)."""
    grad: torch.Tensor | None = None
    """bwd: decoded gradient of this stage's output (from the next stage)."""
    claimed_output: torch.Tensor | None = None
    """What the miner uploaded: the code (fwd) or its input gradient (bwd, fwdbwd); None for a
    stage-0 bwd, which uploads nothing."""
    claimed_loss: float | None = None
    """fwdbwd: the loss the miner reported."""
    hop_id: str = ""


@dataclass(frozen=True)
class Tolerances:
    """Pass thresholds (the measured honest spread behind them: docs/BENCHMARKS.md, "Replay audits")."""

    rel_err: float = 0.05
    min_cosine: float = 0.998
    norm_ratio: float = 0.05
    """Allowed |claimed norm / replayed norm - 1|."""
    loss_abs: float = 0.02
    loss_rel: float = 1e-2
    pg_rel_err: float = 0.25
    pg_min_cosine: float = 0.95


DEFAULT_TOLERANCES = Tolerances()
GROSS_TOLERANCES = Tolerances(rel_err=0.5, min_cosine=0.8, norm_ratio=0.5, loss_abs=0.5, loss_rel=0.05,
                              pg_rel_err=0.5, pg_min_cosine=0.8)
"""What an uncalibrated hop is held to: 2.5x the largest honest error measured on any setup
(0.204, an H200 at d 1024; the 1B run's worst was 0.108) and half of every cheater kind's
smallest (random, copy >= 1.17, lazy and stale 1.0, phantom: missing). docs/VALIDATING.md."""


@dataclass(frozen=True)
class ReplaySettings:
    """What the replay needs from the run: global step numbering, data and wire codec."""

    round_index: int
    inner_steps_per_round: int
    data_seed: int
    batch_size: int
    wire_codec: str = "bf16"
    dataset: DatasetRef | None = None  # the run config's; None: the shipped corpus


@dataclass
class HopCheck:
    """The comparison of one hop (or of the pseudo-gradient, kind 'pseudograd')."""

    index: int
    sample_id: int
    kind: str
    inner_step: int
    ok: bool
    rel_err: float = 0.0
    cosine: float = 1.0
    norm_ratio: float = 1.0
    loss_claimed: float | None = None
    loss_replayed: float | None = None
    reason: str = ""
    calibrated: bool = True
    """False: no calibrated tolerance covers this hop here; it was held to GROSS_TOLERANCES."""
    numeric: bool = False
    """It failed on numbers (rel err, cosine, norm, loss): a second replay may tell noise from cheating."""
    replayed: torch.Tensor | None = None
    """The replay's output, kept only when the check failed on numbers (for the re-check)."""


@dataclass
class AuditReport:
    """Verdict of one audited miner-round."""

    status: str
    """passed | failed | incomplete (time ran out first) | uncalibrated (passed, but some hops had
    no calibrated tolerance: no verdict) | inconclusive (failed, but the validator's own replays
    disagree as much: no verdict). Only failed is a failure."""
    hops: list[HopCheck] = field(default_factory=list)
    pseudo_grad: HopCheck | None = None
    worst_rel_err: float = 0.0
    worst_cosine: float = 1.0
    seconds: float = 0.0
    reason: str = ""
    hops_total: int = 0
    uncalibrated: int = 0
    """Checks judged without a calibrated tolerance."""
    context: str = ""
    """What was replayed (model, numerics, GPUs), when known."""

    @property
    def first_failure(self) -> HopCheck | None:
        """The check that failed (hops, then the pseudo-gradient), or None."""
        return next((c for c in [*self.hops, *([self.pseudo_grad] if self.pseudo_grad else [])] if not c.ok), None)

    @property
    def passed(self) -> bool:
        """True only for a complete replay that matched."""
        return self.status == "passed"

    @property
    def failed(self) -> bool:
        """True when the miner's work did not match (incomplete is not a failure)."""
        return self.status == "failed"


def compare_tensors(replayed: torch.Tensor, claimed: torch.Tensor) -> tuple[float, float, float]:
    """(||claimed - replayed|| / ||replayed||, cosine similarity, ||claimed|| / ||replayed||), in float64."""
    a = replayed.detach().double().reshape(-1)
    b = claimed.detach().double().reshape(-1)
    na, nb = float(a.norm()), float(b.norm())
    diff = float((a - b).norm())
    if na == 0.0:
        rel = 0.0 if nb == 0.0 else math.inf
    else:
        rel = diff / na
    if na == 0.0 and nb == 0.0:
        cos, ratio = 1.0, 1.0
    elif na == 0.0 or nb == 0.0:
        cos, ratio = 0.0, (math.inf if na == 0.0 else 0.0)
    else:
        cos, ratio = float(a @ b) / (na * nb), nb / na
    return rel, cos, ratio


def _judge(check: HopCheck, tol_rel: float, tol_cos: float, tol_norm: float) -> None:
    check.numeric = True
    problems = []
    if not check.rel_err <= tol_rel:
        problems.append(f"rel err {check.rel_err:.3g} > {tol_rel}")
    if not check.cosine >= tol_cos:
        problems.append(f"cosine {check.cosine:.4f} < {tol_cos}")
    if not abs(check.norm_ratio - 1.0) <= tol_norm:
        problems.append(f"norm ratio {check.norm_ratio:.3g} outside 1 +- {tol_norm}")
    if problems:
        check.ok = False
        check.reason = "; ".join(problems)


def _check_tensor(check: HopCheck, replayed: torch.Tensor, claimed: torch.Tensor | None, tol: Tolerances) -> None:
    if claimed is None:
        check.ok, check.reason = False, "missing claimed output"
        return
    if tuple(claimed.shape) != tuple(replayed.shape):
        check.ok, check.reason = False, f"claimed shape {tuple(claimed.shape)} != {tuple(replayed.shape)}"
        return
    check.rel_err, check.cosine, check.norm_ratio = compare_tensors(replayed, claimed)
    _judge(check, tol.rel_err, tol.min_cosine, tol.norm_ratio)
    if not check.ok:
        check.replayed = replayed.detach().to("cpu", torch.float32)


def _tolerance(tolerances, kind: str, inner_step: int) -> tuple[Tolerances, bool]:
    """(thresholds, calibrated) of one hop kind ('pseudograd' too) at an inner step: a single
    Tolerances applies to all; a map by kind; a table (`lookup`) by kind and step."""
    if isinstance(tolerances, Tolerances):
        return tolerances, True
    if hasattr(tolerances, "lookup"):
        return tolerances.lookup(kind, inner_step)
    return tolerances.get(kind, DEFAULT_TOLERANCES), True


def _replay_hop(worker: StageWorker, i: int, rec: HopRecord, settings: ReplaySettings, tolerances) -> HopCheck:
    tol, calibrated = _tolerance(tolerances, rec.kind, rec.inner_step)
    check = HopCheck(index=i, sample_id=rec.sample_id, kind=rec.kind, inner_step=rec.inner_step, ok=True,
                     calibrated=calibrated)
    public = hop_exec.PublicData(settings.data_seed, settings.batch_size, settings.dataset)
    res = hop_exec.run_hop(worker, rec.kind, rec.sample_id, rec.recompute, rec.inputs, rec.grad, public)
    if rec.kind == HopKind.FWD:
        _check_tensor(check, res.out, rec.claimed_output, tol)
    elif res.out is not None:  # an input gradient: the claim went through the wire codec
        _check_tensor(check, codec.roundtrip(res.out, settings.wire_codec), rec.claimed_output, tol)
    elif rec.claimed_output is not None:
        check.ok, check.reason = False, f"stage 0 {rec.kind} claims an output it cannot have"
    if rec.kind == HopKind.FWDBWD:
        check.loss_replayed, check.loss_claimed = res.loss, rec.claimed_loss
        if check.ok:
            bound = tol.loss_abs + tol.loss_rel * abs(res.loss)
            if rec.claimed_loss is None or not abs(rec.claimed_loss - res.loss) <= bound:
                check.ok, check.reason = False, f"loss {rec.claimed_loss!r} vs replayed {res.loss:.5f} (> {bound:.3g})"
                check.numeric = rec.claimed_loss is not None
    return _note_gross(check)


def _note_gross(check: HopCheck) -> HopCheck:
    if not check.ok and not check.calibrated:
        check.reason += " (no calibrated tolerance here: held to the gross bounds, and failed them)"
    return check


def _step(worker: StageWorker, settings: ReplaySettings, inner_step: int) -> None:
    for sid in worker.open_graphs:  # forwards the miner abandoned (their backward went elsewhere)
        worker.release(sid)
    if worker.samples_since_step > 0:
        worker.inner_step(settings.round_index * settings.inner_steps_per_round + inner_step)


def _check_pseudo_grad(pg: Mapping[str, torch.Tensor], claimed: Mapping[str, torch.Tensor], tolerances,
                       index: int, inner_step: int) -> HopCheck:
    tol, calibrated = _tolerance(tolerances, "pseudograd", inner_step)
    check = HopCheck(index=index, sample_id=-1, kind="pseudograd", inner_step=inner_step, ok=True,
                     calibrated=calibrated)
    bad = [n for n in sorted(pg) if n not in claimed or tuple(claimed[n].shape) != tuple(pg[n].shape)]
    if bad or set(claimed) != set(pg):
        check.ok, check.reason = False, f"pseudo-gradient names or shapes differ from the stage's: {bad[:3]}"
        return check
    flat_r = torch.cat([pg[n].reshape(-1) for n in sorted(pg)])
    flat_c = torch.cat([claimed[n].detach().float().reshape(-1) for n in sorted(pg)])
    check.rel_err, check.cosine, check.norm_ratio = compare_tensors(flat_r, flat_c)
    _judge(check, tol.pg_rel_err, tol.pg_min_cosine, tol.pg_rel_err)
    if not check.ok:
        check.replayed = flat_r
    return _note_gross(check)


def replay_round(
    worker_factory: Callable[[], StageWorker],
    theta_start: Mapping[str, torch.Tensor],
    records: Sequence[HopRecord],
    settings: ReplaySettings,
    max_seconds: float = 60.0,
    claimed_pseudo_grad: Mapping[str, torch.Tensor] | None = None,
    tolerances=DEFAULT_TOLERANCES,
    stop_on_failure: bool = True,
) -> AuditReport:
    """Replay a miner's round from theta_start and compare every hop (and the pseudo-gradient).

    `tolerances`: one Tolerances for every hop, {hop kind or 'pseudograd': Tolerances}, or a
    table with `lookup(kind, inner_step)` (neurons.audit_tolerances.ToleranceTable). Stops at the
    first mismatch (failed) or when max_seconds run out (incomplete); `stop_on_failure=False`
    replays every hop (calibration). A replay that passes with uncalibrated hops ends
    `uncalibrated`.
    """
    t0 = time.monotonic()
    context = getattr(tolerances, "context", None)
    report = AuditReport(status="passed", hops_total=len(records),
                         context=context.describe() if context is not None else "")

    def finish(status: str, reason: str = "") -> AuditReport:
        checks = report.hops + ([report.pseudo_grad] if report.pseudo_grad else [])
        report.uncalibrated = sum(not c.calibrated for c in checks)
        if status == "passed" and report.uncalibrated:
            status, reason = "uncalibrated", (
                f"{report.uncalibrated} of {len(checks)} checks had no calibrated tolerance "
                f"({report.context or 'this combination'}) and passed only the gross bounds: no verdict; "
                "calibrate this combination (scripts/calibrate_audit.py)")
        report.status, report.reason = status, reason
        report.seconds = time.monotonic() - t0
        finite = [c for c in checks if c.reason != "missing claimed output"]
        report.worst_rel_err = max((c.rel_err for c in finite), default=0.0)
        report.worst_cosine = min((c.cosine for c in finite), default=1.0)
        log.info("audit %s: %d/%d hops in %.2fs, worst rel err %.3g%s", status, len(report.hops),
                 len(records), report.seconds, report.worst_rel_err, f" ({reason})" if reason else "")
        return report

    steps = [r.inner_step for r in records]
    if any(b < a for a, b in zip(steps, steps[1:])):
        return finish("failed", "hop records are not in inner-step order")
    worker = worker_factory()
    worker.load_theta(theta_start)
    current = records[0].inner_step if records else 0
    for i, rec in enumerate(records):
        if time.monotonic() - t0 > max_seconds:
            return finish("incomplete", f"time limit {max_seconds}s reached after {i} of {len(records)} hops")
        if rec.inner_step != current:
            _step(worker, settings, current)
            current = rec.inner_step
        try:
            check = _replay_hop(worker, i, rec, settings, tolerances)
        except (WorkerError, ValueError) as exc:
            report.hops.append(HopCheck(i, rec.sample_id, rec.kind, rec.inner_step, ok=False, reason=str(exc)))
            return finish("failed", f"hop {i} (sample {rec.sample_id}, {rec.kind}) cannot be replayed: {exc}")
        report.hops.append(check)
        if not check.ok and stop_on_failure:
            return finish("failed", f"hop {i} (sample {rec.sample_id}, {rec.kind}, step {rec.inner_step}): {check.reason}")
    if claimed_pseudo_grad is not None:
        if records:
            _step(worker, settings, current)
        check = _check_pseudo_grad(worker.pseudo_gradient(theta_start), claimed_pseudo_grad,
                                   tolerances, len(records), current)
        report.pseudo_grad = check
        if not check.ok:
            return finish("failed", f"pseudo-gradient: {check.reason}")
    bad = next((c for c in report.hops if not c.ok), None)
    if bad is not None:
        return finish("failed", f"hop {bad.index} (sample {bad.sample_id}, {bad.kind}, step {bad.inner_step}): {bad.reason}")
    return finish("passed")
