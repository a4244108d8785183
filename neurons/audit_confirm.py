"""Confirmed before penalised: an audit that failed on numbers is replayed once more before it counts.

GPU kernels are not deterministic from run to run, so one replay can land far from an honest claim
at one hop by chance. A replay that failed on numbers (rel err, cosine, norm ratio, loss) is
replayed again from the start, independently, and judged by both:

- the second replay passes (or passes with uncalibrated hops): no verdict; the report names the
  first failure as a numerical outlier;
- it fails at the same check, and the validator's own two replays differ there by at least
  1 / `NOISE_MARGIN` of the claim's error against the second: `inconclusive`, no verdict (the
  tolerance was tighter than the validator's own noise at that hop);
- otherwise the failure is confirmed.

Failures that are not numbers (a missing output, a wrong shape, a hop that cannot be replayed,
wrong pseudo-gradient names) are deterministic: they are never replayed again. On a CPU the second
replay is bit-identical to the first, so a CPU failure is always confirmed. A cheater's error is a
multiple of the honest spread (docs/BENCHMARKS.md), far outside both replays' noise.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from .audit import AuditReport, HopCheck, compare_tensors

__all__ = ["NOISE_MARGIN", "confirm_failure"]

log = logging.getLogger(__name__)

NOISE_MARGIN = 3.0


def _noise(a: HopCheck, b: HopCheck) -> float | None:
    """How far the validator's two replays of one check are from each other (None: not comparable)."""
    if a.replayed is not None and b.replayed is not None and a.replayed.shape == b.replayed.shape:
        return compare_tensors(b.replayed, a.replayed)[0]
    if a.loss_replayed is not None and b.loss_replayed is not None:
        return abs(a.loss_replayed - b.loss_replayed)
    return None


def _claim_error(c: HopCheck) -> float:
    if c.replayed is None and c.loss_claimed is not None and c.loss_replayed is not None:
        return abs(c.loss_claimed - c.loss_replayed)
    return c.rel_err


def _free(*reports: AuditReport) -> None:
    for r in reports:
        for c in [*r.hops, *([r.pseudo_grad] if r.pseudo_grad else [])]:
            c.replayed = None


def confirm_failure(first: AuditReport, again: Callable[[], AuditReport]) -> AuditReport:
    """`first` unless it failed on numbers; then the verdict of a second replay (`again()`)."""
    c1 = first.first_failure
    if not first.failed or c1 is None or not c1.numeric:
        _free(first)
        return first
    log.info("audit failed on numbers (%s); replaying once more to confirm", first.reason)
    second = again()
    second.seconds += first.seconds
    c2 = second.first_failure
    try:
        if second.status == "incomplete":
            second.reason = f"confirming a failure ({first.reason}): {second.reason}"
        elif not second.failed:
            second.reason = (f"a first replay failed ({first.reason}), a second did not: a numerical outlier, "
                             f"not penalised" + (f"; {second.reason}" if second.reason else ""))
        elif c2 is not None and c2.numeric and (c2.index, c2.kind) == (c1.index, c1.kind):
            noise = _noise(c1, c2)
            if noise is not None and _claim_error(c2) <= NOISE_MARGIN * noise:
                second.status = "inconclusive"
                second.reason = (f"{second.reason}; but the validator's own two replays differ by {noise:.3g} "
                                 f"there (claim {_claim_error(c2):.3g} <= {NOISE_MARGIN:g} x that): no verdict")
            else:
                second.reason = f"{second.reason} (confirmed by a second replay)"
        else:
            second.reason = f"{second.reason} (confirmed by a second replay; the first: {first.reason})"
    finally:
        _free(first, second)
    return second
