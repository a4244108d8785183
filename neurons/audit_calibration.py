"""Pure logic of audit calibration: honest spread and cheater errors in, tolerances and verdicts out.

`scripts/calibrate_audit.py` replays honest and cheating miners and feeds every hop's comparison
here. Tolerances per (stage, kind) are the largest honest error seen on the calibration rounds
times `margin` (cosine: 1 - (1 - worst cosine) x margin^2, since 1 - cos ~ rel_err^2 / 2), never
under a floor. A cheater's error for one audit is its largest hop error over the honest maximum
of that hop's (stage, kind): the audit fails on its worst hop.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.audit_tolerances import AuditTolerance
from protocol.lifecycle import HopKind

__all__ = ["HopError", "Spread", "honest_spread", "derive_tolerances", "passes", "separation"]


@dataclass(frozen=True)
class HopError:
    """One replayed hop's comparison (kind 'pseudograd' for the pseudo-gradient)."""

    stage: int
    kind: str
    rel_err: float
    cosine: float = 1.0
    norm_ratio: float = 1.0
    loss_diff: float = 0.0
    missing: bool = False
    """The claimed output was absent (a phantom hop): infinitely wrong."""


@dataclass
class Spread:
    """The worst honest values of one (stage, kind)."""

    n: int = 0
    rel_err: float = 0.0
    min_cosine: float = 1.0
    norm_dev: float = 0.0
    loss_diff: float = 0.0


def honest_spread(errors: Iterable[HopError]) -> dict[tuple[int, str], Spread]:
    """{(stage, kind): worst honest values}."""
    out: dict[tuple[int, str], Spread] = defaultdict(Spread)
    for e in errors:
        s = out[(e.stage, e.kind)]
        s.n += 1
        s.rel_err = max(s.rel_err, e.rel_err)
        s.min_cosine = min(s.min_cosine, e.cosine)
        s.norm_dev = max(s.norm_dev, abs(e.norm_ratio - 1.0))
        s.loss_diff = max(s.loss_diff, abs(e.loss_diff))
    return dict(out)


def derive_tolerances(spread: dict[tuple[int, str], Spread], miner: str, replay: str, margin: float = 2.0,
                      floor: float = 1e-3) -> list[AuditTolerance]:
    """One AuditTolerance per (stage, kind) from the honest spread."""
    out = []
    for (stage, kind), s in sorted(spread.items()):
        rel = max(s.rel_err * margin, floor)
        out.append(AuditTolerance(
            miner=miner, replay=replay, stage=stage, kind=kind, rel_err=round(rel, 6),
            min_cosine=round(max(-1.0, 1.0 - max(1.0 - s.min_cosine, floor**2) * margin**2), 8),
            norm_ratio=round(max(s.norm_dev * margin, floor), 6),
            loss_abs=round(max(s.loss_diff * margin, floor), 6), loss_rel=0.0,
            measured_max_rel_err=s.rel_err))
    return out


def passes(e: HopError, tol: AuditTolerance) -> bool:
    """Whether a hop passes `tol`, as neurons.audit judges it (loss only on fwdbwd hops)."""
    if e.missing:
        return False
    ok = e.rel_err <= tol.rel_err and e.cosine >= tol.min_cosine
    if tol.kind != "pseudograd":
        ok = ok and abs(e.norm_ratio - 1.0) <= tol.norm_ratio
    else:
        ok = ok and abs(e.norm_ratio - 1.0) <= tol.rel_err
    if tol.kind == HopKind.FWDBWD:
        ok = ok and abs(e.loss_diff) <= tol.loss_abs
    return ok


def separation(audit: Iterable[HopError], spread: dict[tuple[int, str], Spread]) -> float:
    """A cheating audit's error in units of the honest maximum: max over its hops of
    rel_err / honest max rel_err of that (stage, kind) (inf for a missing output)."""
    worst = 0.0
    for e in audit:
        if e.missing:
            return math.inf
        ref = spread.get((e.stage, e.kind))
        if ref is None:
            continue
        worst = max(worst, e.rel_err / max(ref.rel_err, 1e-12))
    return worst
