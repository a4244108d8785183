"""Validators' published reports (verdicts, scores, weights, held-out losses), kept for the
dashboard; JSON on disk.

Written atomically after every report, so a bridge restart loses nothing; a corrupt file is moved
aside (never parsed as anything but JSON) and the store starts empty. With several bridge
processes the document lives in the shared database instead (`docs`: `read_doc(name)` and
`update_doc(name, fn)`, a locked read-modify-write), so every process shows every report.
"""
from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import threading
import time
from typing import Any, Optional

from protocol.console import ValidationLossReport, ValidatorReport

__all__ = ["ConsoleStore", "RECENT_VERDICTS", "VALIDATION_ROUNDS", "validation_figure"]

log = logging.getLogger(__name__)
RECENT_VERDICTS = 200
VALIDATION_ROUNDS = 1000  # rounds of held-out losses kept


def validation_figure(reports: dict[str, dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The median of validators' held-out losses of one round: a minority of validators that
    report nonsense moves it no further than the honest spread."""
    if not reports:
        return None
    losses = [r["loss"] for r in reports.values()]
    return {"loss": statistics.median(losses), "validators": len(losses),
            "tokens": min(r["tokens"] for r in reports.values())}


class ConsoleStore:
    """Latest report per validator, audit tallies per miner, and the most recent verdicts."""

    def __init__(self, path: str, docs: Any = None) -> None:
        self.path, self.docs = path, docs
        self._lock = threading.Lock()
        self.validators: dict[str, dict[str, Any]] = {}
        self.audits: dict[str, dict[str, Any]] = {}
        self.verdicts: list[dict[str, Any]] = []
        self.validation: dict[str, dict[str, dict[str, Any]]] = {}  # round -> validator -> report
        self._load()

    def _take(self, text: Optional[str]) -> None:
        doc = json.loads(text) if text else {}
        self.validators, self.audits = dict(doc.get("validators", {})), dict(doc.get("audits", {}))
        self.verdicts = list(doc.get("verdicts", []))[-RECENT_VERDICTS:]
        self.validation = dict(doc.get("validation", {}))

    def _dump(self) -> str:
        return json.dumps({"validators": self.validators, "audits": self.audits,
                           "verdicts": self.verdicts, "validation": self.validation})

    def _load(self) -> None:
        if self.docs is not None:
            self._take(self.docs.read_doc("console"))
            return
        if not os.path.exists(self.path):
            return
        try:
            with open(self.path, encoding="utf-8") as f:
                doc = json.load(f)
            self.validators, self.audits = dict(doc["validators"]), dict(doc["audits"])
            self.verdicts = list(doc["verdicts"])[-RECENT_VERDICTS:]
            self.validation = dict(doc.get("validation", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            os.replace(self.path, aside)
            log.warning("dashboard store %s unreadable (%s); moved to %s, starting empty",
                        self.path, exc, aside)
            self.validators, self.audits, self.verdicts, self.validation = {}, {}, [], {}

    def add(self, validator: str, report: ValidatorReport, now: float) -> None:
        """Fold one validator's report in and persist."""
        if self.docs is not None:
            def fold(text: Optional[str]) -> str:
                self._take(text)
                self._fold(validator, report, now)
                return self._dump()
            with self._lock:
                self.docs.update_doc("console", fold)
            return
        with self._lock:
            self._fold(validator, report, now)
            self._save()

    def _fold(self, validator: str, report: ValidatorReport, now: float) -> None:
        """Fold one report into the in-memory document."""
        v = self.validators.setdefault(validator, {"weights": None, "weights_at": None})
        v.update(at=now, round=report.round, window=report.window, scores=dict(report.scores))
        if report.weights is not None:
            v.update(weights=dict(report.weights), weights_at=now)
        for verdict in report.verdicts:
            a = self.audits.setdefault(verdict.hotkey, {"passed": 0, "failed": 0})
            a["passed" if verdict.passed else "failed"] += 1
            a.update(last_round=verdict.round, last_passed=verdict.passed,
                     last_reason=verdict.reason)
            self.verdicts.append({"validator": validator, "at": now, **verdict.model_dump()})
        self.verdicts = self.verdicts[-RECENT_VERDICTS:]

    def add_validation(self, validator: str, report: ValidationLossReport, now: float) -> None:
        """Keep a validator's held-out loss of a round's model (a repeat replaces its earlier one)."""
        def keep() -> None:
            self.validation.setdefault(str(report.round), {})[validator] = {
                "loss": report.loss, "tokens": report.tokens, "at": now}
            for r in sorted(self.validation, key=int)[:-VALIDATION_ROUNDS]:
                del self.validation[r]
        if self.docs is not None:
            def fold(text: Optional[str]) -> str:
                self._take(text)
                keep()
                return self._dump()
            with self._lock:
                self.docs.update_doc("console", fold)
            return
        with self._lock:
            keep()
            self._save()

    def validation_at(self, round_: int) -> Optional[dict[str, Any]]:
        """The median figure of one round (None: no report)."""
        with self._lock:
            if self.docs is not None:
                self._load()  # other bridge processes may have added reports
            return validation_figure(self.validation.get(str(round_), {}))

    def snapshot(self) -> dict[str, Any]:
        """A deep copy for the dashboard view."""
        with self._lock:
            if self.docs is not None:
                self._load()  # other bridge processes may have added reports
            return json.loads(json.dumps({"validators": self.validators, "audits": self.audits,
                                          "verdicts": self.verdicts, "validation": self.validation}))

    def _save(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".console-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"validators": self.validators, "audits": self.audits,
                           "verdicts": self.verdicts, "validation": self.validation}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
