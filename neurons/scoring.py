"""Validator scoring: verified throughput x integrity, smoothed per window; weights; audit choice.

Pure Python (no torch, no network). The validator feeds a `ScoreBook` the hops each miner
completed per round (`record_round`) and the verdicts of the audits it ran (`record_audit`),
closes a window when it is time to set weights (`close_window`), and persists the book as JSON
after every change (`save`, atomic) so that nothing is lost on a crash.

Every knob comes from `protocol.incentives.IncentiveParams` (the run config's `incentives`, which
all validators share); the defaults below are `DEFAULT_INCENTIVES`.

Rules:
* a hop's throughput weight reflects its compute (defaults: fwd 1, bwd 2, fwdbwd 3, recompute bwd 3),
  times the stage's weight when the run sets per-stage weights;
* a round counts when its audit passed or it was not sampled; a round with a pending audit
  counts when its window closes (audits are unpredictable samples, not a gate on every round);
* a failed audit zeroes the miner's score at once (the EMA restarts from 0), voids the rest of
  its current window and earns nothing for `penalty_windows` further windows (times
  `penalty_growth` per earlier failure; the default 1 keeps the penalty flat);
* window score s_w = verified throughput; score = EMA(alpha) over windows (a miner absent from
  a window gets 0 for it).
Miners are keyed by hotkey (uids get recycled); the validator maps hotkeys to uids.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Optional

from protocol.incentives import DEFAULT_INCENTIVES, IncentiveParams

__all__ = [
    "HOP_WEIGHTS",
    "AuditHistory",
    "ScoreBook",
    "ScoringError",
    "hop_throughput",
    "compute_weights",
    "choose_audits",
]

log = logging.getLogger(__name__)

_D = DEFAULT_INCENTIVES
HOP_WEIGHTS: dict[str, float] = dict(_D.hop_weights)
_FORMAT = 1


class ScoringError(ValueError):
    """Bad input to scoring: unknown hop kind, negative count, bad parameter, corrupt book."""


def hop_throughput(hops: Mapping[str, int], params: IncentiveParams = _D,
                   stage: Optional[int] = None) -> float:
    """Compute-weighted hop count with `params`' hop (and stage) weights; default fwd 1, bwd 2, 3, 3."""
    total = 0.0
    for kind, count in hops.items():
        if kind not in params.hop_weights:
            raise ScoringError(f"unknown hop kind {kind!r}; expected one of {sorted(params.hop_weights)}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ScoringError(f"hop count for {kind!r} must be a non-negative int, got {count!r}")
        try:
            total += params.hop_weight(kind, stage) * count
        except ValueError as exc:
            raise ScoringError(str(exc)) from None
    return total


@dataclass
class AuditHistory:
    """How often a miner was audited, and how it went."""

    passed: int = 0
    failed: int = 0
    last_failed_window: int | None = None


@dataclass
class _Miner:
    ema: float = 0.0
    penalty_until: int = -1  # last window (inclusive) that earns nothing
    pending: dict[str, float] = field(default_factory=dict)  # round key -> throughput (this window)
    audits: dict[str, bool] = field(default_factory=dict)  # round key -> passed (this window)
    history: AuditHistory = field(default_factory=AuditHistory)


class ScoreBook:
    """Per-miner verified throughput, audit verdicts and EMA scores over windows; JSON-serialisable."""

    def __init__(self, alpha: float = _D.ema_alpha, penalty_windows: int = _D.penalty_windows,
                 params: IncentiveParams = _D) -> None:
        if not (0.0 < alpha <= 1.0):
            raise ScoringError(f"alpha must be in (0, 1], got {alpha!r}")
        if isinstance(penalty_windows, bool) or not isinstance(penalty_windows, int) or penalty_windows < 0:
            raise ScoringError(f"penalty_windows must be a non-negative int, got {penalty_windows!r}")
        self.alpha = float(alpha)
        self.penalty_windows = penalty_windows
        self.params = params  # hop and stage weights; alpha and penalty above win over its copies
        self.window = 0
        self._miners: dict[str, _Miner] = {}

    def _miner(self, hotkey: str) -> _Miner:
        if not isinstance(hotkey, str) or not hotkey:
            raise ScoringError(f"hotkey must be a non-empty string, got {hotkey!r}")
        return self._miners.setdefault(hotkey, _Miner())

    @classmethod
    def from_params(cls, params: IncentiveParams) -> "ScoreBook":
        """A new book scoring with the run's incentive parameters."""
        return cls(alpha=params.ema_alpha, penalty_windows=params.penalty_windows, params=params)

    def record_round(self, hotkey: str, round_id: int, hops: Mapping[str, int],
                     stage: Optional[int] = None) -> float:
        """Add a miner's completed hops for one round to the open window; returns its throughput."""
        value = hop_throughput(hops, self.params, stage)
        m = self._miner(hotkey)
        key = str(int(round_id))
        m.pending[key] = m.pending.get(key, 0.0) + value
        return value

    def record_audit(self, hotkey: str, round_id: int, passed: bool, reason: str = "") -> None:
        """Record an audit verdict; a failure zeroes the score and starts the penalty at once."""
        m = self._miner(hotkey)
        if passed:
            m.history.passed += 1
            m.audits[str(int(round_id))] = True
            return
        m.history.failed += 1
        m.history.last_failed_window = self.window
        m.audits[str(int(round_id))] = False
        m.ema = 0.0
        growth = self.params.penalty_growth ** min(m.history.failed - 1, 64)  # repeat offenders wait longer
        m.penalty_until = self.window + int(min(self.penalty_windows * growth, 1_000_000))
        log.warning("audit failed: %s round %s (%s); score zeroed, penalty through window %d",
                    hotkey, round_id, reason or "no reason given", m.penalty_until)

    def window_score(self, hotkey: str) -> float:
        """Verified throughput the open window would give this miner if it closed now."""
        m = self._miners.get(hotkey)
        if m is None or self.window <= m.penalty_until:
            return 0.0
        return sum(v for k, v in m.pending.items() if m.audits.get(k, True))

    def close_window(self) -> dict[str, float]:
        """Fold the open window into every miner's EMA, open the next one; returns the scores."""
        for hotkey in sorted(self._miners):
            m = self._miners[hotkey]
            raw = self.window_score(hotkey)
            m.ema = self.alpha * raw + (1.0 - self.alpha) * m.ema
            m.pending.clear()
            m.audits.clear()
        self.window += 1
        return self.scores()

    def scores(self) -> dict[str, float]:
        """Smoothed score per hotkey (sorted by hotkey)."""
        return {h: self._miners[h].ema for h in sorted(self._miners)}

    def audit_history(self) -> dict[str, AuditHistory]:
        """Audit counts per hotkey, for `choose_audits`."""
        return {h: self._miners[h].history for h in sorted(self._miners)}

    def forget(self, hotkey: str) -> None:
        """Drop a miner (deregistered hotkey)."""
        self._miners.pop(hotkey, None)

    def to_json(self) -> str:
        """Serialise the whole book (canonical: sorted keys)."""
        doc = {
            "format": _FORMAT,
            "alpha": self.alpha,
            "penalty_windows": self.penalty_windows,
            "window": self.window,
            "miners": {h: asdict(m) for h, m in self._miners.items()},
        }
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ScoreBook":
        """Rebuild a book from `to_json` output; raises ScoringError naming what is wrong."""
        try:
            doc = json.loads(text)
            if doc.get("format") != _FORMAT:
                raise ScoringError(f"unsupported score book format {doc.get('format')!r}")
            book = cls(alpha=doc["alpha"], penalty_windows=doc["penalty_windows"])
            book.window = int(doc["window"])
            for h, md in doc["miners"].items():
                m = _Miner(
                    ema=float(md["ema"]),
                    penalty_until=int(md["penalty_until"]),
                    pending={str(k): float(v) for k, v in md["pending"].items()},
                    audits={str(k): bool(v) for k, v in md["audits"].items()},
                    history=AuditHistory(**md["history"]),
                )
                if not math.isfinite(m.ema) or m.ema < 0:
                    raise ScoringError(f"miner {h}: bad ema {m.ema!r}")
                book._miners[h] = m
        except ScoringError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ScoringError(f"corrupt score book: {exc!r}") from None
        return book

    def save(self, path: str) -> None:
        """Write the book atomically (temp file, fsync, rename)."""
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".scorebook-", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str, alpha: float = _D.ema_alpha, penalty_windows: int = _D.penalty_windows,
             params: Optional[IncentiveParams] = None) -> "ScoreBook":
        """Load a saved book, or start a new one if the file does not exist; `params` win when given."""
        if params is not None:
            alpha, penalty_windows = params.ema_alpha, params.penalty_windows
        if not os.path.exists(path):
            return cls(alpha=alpha, penalty_windows=penalty_windows, params=params or _D)
        with open(path) as f:
            book = cls.from_json(f.read())
        if params is not None:  # the run's settings, not the ones the book was saved with
            book.alpha, book.penalty_windows, book.params = alpha, penalty_windows, params
        return book


def compute_weights(
    scores: Mapping[int, float], uids: Sequence[int], owner_uid: int, burn_share: float
) -> tuple[list[int], list[float]]:
    """Normalised weights (sorted uids, summing to 1): burn_share to the owner, the rest by score.

    Only uids in `uids` (the metagraph) with a positive score qualify; the owner's own score
    is ignored. With no qualifying miner everything goes to the owner.
    """
    if not (0.0 <= burn_share <= 1.0):
        raise ScoringError(f"burn_share must be in [0, 1], got {burn_share!r}")
    if owner_uid not in uids:
        raise ScoringError(f"owner uid {owner_uid} is not in the metagraph uids")
    members = set(uids)
    miner: dict[int, float] = {}
    for uid, s in scores.items():
        if not math.isfinite(s) or s < 0:
            raise ScoringError(f"score of uid {uid} must be finite and >= 0, got {s!r}")
        if uid in members and uid != owner_uid and s > 0:
            miner[uid] = float(s)
    total = sum(miner[u] for u in sorted(miner))
    if not miner or burn_share == 1.0:
        return [owner_uid], [1.0]
    weights = {u: (1.0 - burn_share) * miner[u] / total for u in miner}
    if burn_share > 0:
        weights[owner_uid] = burn_share
    out_uids = sorted(weights)
    return out_uids, [weights[u] for u in out_uids]


def choose_audits(
    miners: Sequence[str],
    rng: random.Random | None = None,
    fraction: float = 0.25,
    history: Mapping[str, AuditHistory] | None = None,
    new_boost: float = _D.new_boost,
    failed_boost: float = _D.failed_boost,
    new_threshold: int = _D.new_threshold,
    params: Optional[IncentiveParams] = None,
) -> list[str]:
    """Pick miners to audit after a round: each with probability fraction x boost (capped at 1).

    Boost is `failed_boost` for a miner that ever failed an audit, `new_boost` for one with
    fewer than `new_threshold` passed audits, else 1. At least one miner is picked when any
    exist. rng None uses an OS-entropy seeded generator so nobody can predict the choice.
    `params` (the run's incentives), when given, sets fraction and the boosts.
    """
    if params is not None:
        fraction, new_boost = params.audit_fraction, params.new_boost
        failed_boost, new_threshold = params.failed_boost, params.new_threshold
    if not (0.0 < fraction <= 1.0):
        raise ScoringError(f"fraction must be in (0, 1], got {fraction!r}")
    history = history or {}
    rng = rng if rng is not None else random.Random(secrets.randbits(256))
    pool = sorted(set(miners))
    if not pool:
        return []
    probs: list[float] = []
    for h in pool:
        hist = history.get(h, AuditHistory())
        boost = failed_boost if hist.failed > 0 else (new_boost if hist.passed < new_threshold else 1.0)
        probs.append(min(1.0, fraction * boost))
    chosen = [h for h, p in zip(pool, probs) if rng.random() < p]
    if not chosen:
        chosen = [rng.choices(pool, weights=probs, k=1)[0]]
    return sorted(chosen)
