"""Validators' published reports (verdicts, scores, weights), kept for the dashboard; JSON on disk.

Written atomically after every report, so a bridge restart loses nothing; a corrupt file is moved
aside (never parsed as anything but JSON) and the store starts empty.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from typing import Any

from protocol.console import ValidatorReport

__all__ = ["ConsoleStore", "RECENT_VERDICTS"]

log = logging.getLogger(__name__)
RECENT_VERDICTS = 200


class ConsoleStore:
    """Latest report per validator, audit tallies per miner, and the most recent verdicts."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.validators: dict[str, dict[str, Any]] = {}
        self.audits: dict[str, dict[str, Any]] = {}
        self.verdicts: list[dict[str, Any]] = []
        self._load()

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            self.validators, self.audits = dict(doc["validators"]), dict(doc["audits"])
            self.verdicts = list(doc["verdicts"])[-RECENT_VERDICTS:]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            os.replace(self.path, aside)
            log.warning("dashboard store %s unreadable (%s); moved to %s, starting empty",
                        self.path, exc, aside)
            self.validators, self.audits, self.verdicts = {}, {}, []

    def add(self, validator: str, report: ValidatorReport, now: float) -> None:
        """Fold one validator's report in and persist."""
        with self._lock:
            v = self.validators.setdefault(validator, {"weights": None, "weights_at": None})
            v.update(at=now, round=report.round, window=report.window, scores=dict(report.scores),
                     uncalibrated=list(report.uncalibrated))
            if report.weights is not None:
                v.update(weights=dict(report.weights), weights_at=now)
            for verdict in report.verdicts:
                a = self.audits.setdefault(verdict.hotkey, {"passed": 0, "failed": 0})
                a["passed" if verdict.passed else "failed"] += 1
                a.update(last_round=verdict.round, last_passed=verdict.passed,
                         last_reason=verdict.reason)
                self.verdicts.append({"validator": validator, "at": now, **verdict.model_dump()})
            self.verdicts = self.verdicts[-RECENT_VERDICTS:]
            self._save()

    def snapshot(self) -> dict[str, Any]:
        """A deep copy for the dashboard view."""
        with self._lock:
            return json.loads(json.dumps({"validators": self.validators, "audits": self.audits,
                                          "verdicts": self.verdicts}))

    def _save(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".console-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"validators": self.validators, "audits": self.audits,
                           "verdicts": self.verdicts}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
