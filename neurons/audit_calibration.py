"""Pure logic of audit calibration: honest spread and cheater errors in, tolerances and verdicts out.

`scripts/calibrate_audit.py` replays honest and cheating miners and feeds every hop's comparison
here. Honest drift grows through a round (one differing inner step moves every later one), so an
entry covers the inner steps it was measured at: 0 .. H - 1 of the calibration's rounds (a run with
a larger H has later hops no entry covers: uncalibrated). Within a round the steps are pooled:
splitting them into ranges ([0], [1], [2-3], [4-7]) left too few hops per range for the heavy tail
(the H200 calibration's held-out check: 29 false positives of 2,548 split, 0 pooled;
docs/BENCHMARKS.md). Tolerances per (stage, kind) are the largest honest error seen times `margin`
(cosine: 1 - (1 - worst cosine) x margin^2, since 1 - cos ~ rel_err^2 / 2), never under a floor.
A cheater's error for one audit is its largest hop error over the honest maximum of that hop's
(stage, kind): the audit fails on its worst hop.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from protocol.audit_tolerances import AuditTolerance
from protocol.lifecycle import HopKind

__all__ = ["HopError", "Spread", "CalibrationKey", "step_range", "honest_spread", "spread_at",
           "derive_tolerances", "passes", "separation"]

Steps = tuple[int, int]


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
    step: int | None = None
    """Inner step of the hop (None: not recorded by older calibrations)."""


@dataclass
class Spread:
    """The worst honest values of one (stage, kind, steps covered)."""

    n: int = 0
    rel_err: float = 0.0
    min_cosine: float = 1.0
    norm_dev: float = 0.0
    loss_diff: float = 0.0


@dataclass(frozen=True)
class CalibrationKey:
    """What a calibration was measured on (written into every entry; '*' for any)."""

    miner: str
    replay: str
    model: str = "*"
    miner_gpu: str = "*"
    replay_gpu: str = "*"


def step_range(kind: str, step: int | None, steps_per_round: int) -> Steps:
    """The inner steps an entry measured on rounds of `steps_per_round` steps covers: all of them
    (pooled; see the module docstring), for every kind."""
    return (0, steps_per_round - 1)


def honest_spread(errors: Iterable[HopError], steps_per_round: int = 1) -> dict[tuple[int, str, Steps], Spread]:
    """{(stage, kind, inner steps covered): worst honest values}."""
    out: dict[tuple[int, str, Steps], Spread] = defaultdict(Spread)
    for e in errors:
        s = out[(e.stage, e.kind, step_range(e.kind, e.step, steps_per_round))]
        s.n += 1
        s.rel_err = max(s.rel_err, e.rel_err)
        s.min_cosine = min(s.min_cosine, e.cosine)
        s.norm_dev = max(s.norm_dev, abs(e.norm_ratio - 1.0))
        s.loss_diff = max(s.loss_diff, abs(e.loss_diff))
    return dict(out)


def spread_at(spread: dict[tuple[int, str, Steps], Spread], stage: int, kind: str, step: int | None,
              steps_per_round: int) -> Spread | None:
    """The spread that covers a hop (None: no honest hop of its stage and kind)."""
    return spread.get((stage, kind, step_range(kind, step, steps_per_round)))


def derive_tolerances(spread: dict[tuple[int, str, Steps], Spread], key: CalibrationKey, margin: float = 2.0,
                      floor: float = 1e-3) -> list[AuditTolerance]:
    """One AuditTolerance per (stage, kind, steps covered) from the honest spread, keyed by `key`."""
    out = []
    for (stage, kind, (lo, hi)), s in sorted(spread.items()):
        rel = max(s.rel_err * margin, floor)
        out.append(AuditTolerance(
            model=key.model, miner=key.miner, replay=key.replay, miner_gpu=key.miner_gpu,
            replay_gpu=key.replay_gpu, stage=stage, kind=kind, step_from=lo, step_to=hi, rel_err=round(rel, 6),
            min_cosine=round(max(-1.0, 1.0 - max(1.0 - s.min_cosine, floor**2) * margin**2), 8),
            norm_ratio=round(max(s.norm_dev * margin, floor), 6),
            loss_abs=round(max(s.loss_diff * margin, floor), 6), loss_rel=0.0,
            measured_max_rel_err=s.rel_err, measured_hops=s.n))
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


def separation(audit: Iterable[HopError], spread: dict[tuple[int, str, Steps], Spread],
               steps_per_round: int = 1) -> float:
    """A cheating audit's error in units of the honest maximum: max over its hops of
    rel_err / honest max rel_err of that (stage, kind) (inf for a missing output)."""
    worst = 0.0
    for e in audit:
        if e.missing:
            return math.inf
        ref = spread_at(spread, e.stage, e.kind, e.step, steps_per_round)
        if ref is None:
            continue
        worst = max(worst, e.rel_err / max(ref.rel_err, 1e-12))
    return worst
