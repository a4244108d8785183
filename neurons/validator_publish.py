"""The validator's side of the owner's dashboard and of shared incentives.

`run_incentives` picks the run's incentive parameters (validators must agree, so the run config
wins over local flags, with one warning naming the flags it overrides). `ReportPublisher` posts
audit verdicts, scores and the weights just set to the bridge (`POST /v1/validator/report`);
a bridge that cannot take them costs one warning and never stops the validator.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import httpx

from protocol.client import BridgeError
from protocol.console import MAX_VERDICTS, AuditVerdict, ValidatorReport
from protocol.incentives import IncentiveParams

__all__ = ["run_incentives", "ReportPublisher"]

log = logging.getLogger("validator")

_FLAGS = {"audit_fraction": ("--audit.fraction", "audit_fraction"),
          "burn_share": ("--burn-share", "burn_share"),
          "ema_alpha": ("--ema-alpha", "ema_alpha"),
          "penalty_windows": ("--penalty-windows", "penalty_windows")}


def run_incentives(settings: Any, params: IncentiveParams) -> IncentiveParams:
    """The run's incentives; warns once about local settings that differ (they are not used)."""
    differ = [f"{flag}={getattr(settings, attr)} (run: {getattr(params, attr)})"
              for attr, (flag, _) in _FLAGS.items()
              if getattr(settings, attr, None) is not None and getattr(settings, attr) != getattr(params, attr)]
    if differ:
        log.warning("the run config's incentives override local settings so that validators agree: %s",
                    ", ".join(differ))
    return params


class ReportPublisher:
    """Posts the validator's verdicts, scores and weights to the bridge for its dashboard."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent = 0  # verdicts of the audit log already published
        self.uncalibrated: list[str] = []  # the latest list: every report carries it
        self._warned = False

    def _post(self, report: ValidatorReport) -> bool:
        try:
            self.client.validator_report(report)
            return True
        except (BridgeError, httpx.TransportError) as exc:
            if not self._warned:
                log.warning("could not publish to the bridge dashboard (%s); will keep trying quietly", exc)
                self._warned = True
            return False

    def round_done(self, rnd: int, book: Any, verdicts: Sequence[tuple], uncalibrated: Sequence[str] = ()) -> None:
        """Publish the verdicts recorded since the last report, current scores, and the combinations
        audited without a calibration."""
        new = [AuditVerdict(round=r, hotkey=hk, passed=ok, reason=str(reason)[:512])
               for r, hk, ok, reason in verdicts[self.sent:]][-MAX_VERDICTS:]
        self.uncalibrated = sorted(c[:512] for c in uncalibrated)[:64]
        report = ValidatorReport(round=rnd, window=book.window, verdicts=new, scores=book.scores(),
                                 uncalibrated=self.uncalibrated)
        if self._post(report):
            self.sent = len(verdicts)

    def weights_set(self, rnd: int, book: Any, metagraph: Any, uids: Sequence[int],
                    weights: Sequence[float]) -> None:
        """Publish the weights just set, keyed by hotkey."""
        by_uid = {n.uid: n.hotkey for n in metagraph.neurons}
        named = {by_uid[u]: float(w) for u, w in zip(uids, weights) if u in by_uid}
        self._post(ValidatorReport(round=rnd, window=book.window, scores=book.scores(), weights=named,
                                   uncalibrated=self.uncalibrated))
