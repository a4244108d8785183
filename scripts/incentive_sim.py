"""The incentive simulator's model: a population of miners run through the validator's own code.

Every round, each miner's verified hops go into a real `ScoreBook` (`record_round`), the real
`choose_audits` picks whom to audit, a cheater caught by an audit gets `record_audit(False)`;
every window the book closes and the real `compute_weights` turns scores into emission. Nothing
here re-implements scoring: change `neurons.scoring` and the simulator follows.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from neurons.scoring import ScoreBook, choose_audits, compute_weights
from protocol.incentives import IncentiveParams

__all__ = ["CHEAT_KINDS", "Speed", "HonestSpec", "CheaterSpec", "SybilSpec", "Population",
           "Member", "SimResult", "simulate", "gini"]

CHEAT_KINDS = ("random", "stale", "copy", "lazy", "phantom")
OWNER_UID = 0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Speed(_Spec):
    """Hops per round: log-normal around `median` with log-sigma `sigma` (0: everyone at median)."""

    median: float = Field(default=40.0, gt=0, le=1e6)
    sigma: float = Field(default=0.5, ge=0, le=5)

    def draw(self, rng: random.Random) -> int:
        """One miner's hops per round (at least 1)."""
        x = self.median * (math.exp(rng.gauss(0.0, self.sigma)) if self.sigma else 1.0)
        return max(1, int(round(x)))


class HonestSpec(_Spec):
    """The honest population: how many, how fast, how often one leaves (and a new one joins)."""

    count: int = Field(default=16, ge=1, le=10_000)
    speed: Speed = Field(default_factory=Speed)
    churn: float = Field(default=0.02, ge=0, le=1, description="per-window chance a miner is replaced")


class CheaterSpec(_Spec):
    """One cheater kind: claimed throughput, how often it cheats, and how visible the cheat is."""

    kind: Literal["random", "stale", "copy", "lazy", "phantom"]
    count: int = Field(default=1, ge=1, le=1000)
    hops_per_round: int = Field(default=40, ge=1, le=1_000_000, description="claimed throughput")
    detection: float = Field(ge=0, le=1, description="chance one audit of a cheated round catches it")
    verified_fraction: float = Field(
        default=1.0, ge=0, le=1,
        description="share of claimed hops the bridge verifies (phantom: 0, its outputs never land)")
    cheat_rate: float = Field(default=1.0, gt=0, le=1, description="share of rounds it cheats in")
    start_window: int = Field(default=0, ge=0, le=100_000,
                              description="works honestly (building audit trust) until this window")


class SybilSpec(_Spec):
    """One operator's throughput split over `split` hotkeys (compared to the same, unsplit)."""

    hops_per_round: int = Field(default=40, ge=1, le=1_000_000)
    split: int = Field(default=4, ge=2, le=1000)


class Population(_Spec):
    """The population file (YAML): everything a simulation needs besides the incentive params."""

    windows: int = Field(default=40, ge=1, le=100_000)
    rounds_per_window: int = Field(default=4, ge=1, le=10_000)
    stages: int = Field(default=2, ge=1, le=64)
    seed: int = Field(default=1, ge=0)
    incentives: dict[str, Any] = Field(default_factory=dict, description="IncentiveParams overrides")
    honest: HonestSpec = Field(default_factory=HonestSpec)
    cheaters: list[CheaterSpec] = Field(default_factory=list, max_length=100)
    sybils: list[SybilSpec] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _params_ok(self) -> "Population":
        sw = self.params().stage_weights  # raises a ValidationError naming a bad incentive field
        if sw is not None and len(sw) != self.stages:
            raise ValueError(f"incentives.stage_weights has {len(sw)} entries for {self.stages} stages")
        return self

    def params(self) -> IncentiveParams:
        """The incentive parameters this population is simulated under."""
        return IncentiveParams.model_validate(self.incentives)


@dataclass
class Member:
    """One simulated hotkey."""

    hotkey: str
    uid: int
    klass: str              # honest | cheater:<kind> | twin | sybil | unsplit
    hops: int
    stage: int
    cheater: Optional[CheaterSpec] = None
    group: int = -1         # index of its cheater/sybil spec (twins and unsplit share it)
    joined: int = 0
    left: Optional[int] = None
    earned: float = 0.0     # from its spec's start_window on (cheaters and their twins), else all
    per_window: list[float] = field(default_factory=list)
    first_fail_window: Optional[int] = None


@dataclass
class SimResult:
    """What one simulation produced."""

    params: IncentiveParams
    members: list[Member]
    owner_earned: float
    windows: int
    rounds_per_window: int
    audits: int
    class_share: dict[str, list[float]]   # class -> emission share per window


def _hops(n: int, stage: int, stages: int) -> dict[str, int]:
    """A round's hops for `n` samples: fwd + bwd each on an inner stage, fwdbwd on the last."""
    return {"fwdbwd": n} if stage == stages - 1 else {"fwd": n, "bwd": n}


def _build(pop: Population, rng: random.Random) -> list[Member]:
    members: list[Member] = []

    def add(klass: str, hops: int, stage: int, cheater: Optional[CheaterSpec] = None, group: int = -1) -> None:
        uid = len(members) + 1
        members.append(Member(f"hk{uid:05d}", uid, klass, hops, stage, cheater, group))

    for i in range(pop.honest.count):
        add("honest", pop.honest.speed.draw(rng), i % pop.stages)
    for i, c in enumerate(pop.cheaters):
        for _ in range(c.count):
            add(f"cheater:{c.kind}", c.hops_per_round, i % pop.stages, c, i)
        add("twin", c.hops_per_round, i % pop.stages, group=i)  # honest, same claimed throughput and stage
    for i, s in enumerate(pop.sybils):
        each = max(1, s.hops_per_round // s.split)
        for _ in range(s.split):
            add("sybil", each, i % pop.stages, group=i)
        add("unsplit", each * s.split, i % pop.stages, group=i)
    return members


def simulate(pop: Population, params: Optional[IncentiveParams] = None, seed: Optional[int] = None) -> SimResult:
    """Run the population through the validator's scoring for `pop.windows` windows."""
    params = params or pop.params()
    rng = random.Random(pop.seed if seed is None else seed)
    members = _build(pop, rng)
    book = ScoreBook.from_params(params)
    by_hotkey = {m.hotkey: m for m in members}
    owner_earned, audits, rid = 0.0, 0, 0
    class_share: dict[str, list[float]] = {}
    for w in range(pop.windows):
        active = [m for m in members if m.left is None]
        by_hotkey.update((m.hotkey, m) for m in active)  # newcomers from churn
        for _ in range(pop.rounds_per_window):
            cheated: set[str] = set()
            present = []
            for m in active:
                c = m.cheater
                verified = m.hops if c is None else int(round(m.hops * c.verified_fraction))
                if c is not None and w >= c.start_window and rng.random() < c.cheat_rate:
                    cheated.add(m.hotkey)
                if verified > 0:
                    book.record_round(m.hotkey, rid, _hops(verified, m.stage, pop.stages), stage=m.stage)
                    present.append(m.hotkey)
            for hk in choose_audits(present, rng=rng, history=book.audit_history(), params=params) if present else []:
                audits += 1
                m = by_hotkey[hk]
                caught = hk in cheated and rng.random() < m.cheater.detection
                book.record_audit(hk, rid, not caught, "simulated audit")
                if caught and m.first_fail_window is None:
                    m.first_fail_window = w
            rid += 1
        scores = book.close_window()
        uid_scores = {by_hotkey[hk].uid: s for hk, s in scores.items()}
        uids, weights = compute_weights(uid_scores, [OWNER_UID] + [m.uid for m in active], OWNER_UID,
                                        params.burn_share)
        paid = dict(zip(uids, weights))
        owner_earned += paid.get(OWNER_UID, 0.0)
        window_share: dict[str, float] = {"owner": paid.get(OWNER_UID, 0.0)}
        for m in active:
            x = paid.get(m.uid, 0.0)
            start = pop.cheaters[m.group].start_window if m.klass == "twin" or m.cheater else 0
            m.earned += x if w >= start else 0.0
            m.per_window.append(x)
            window_share[m.klass] = window_share.get(m.klass, 0.0) + x
        for k, x in window_share.items():
            class_share.setdefault(k, [0.0] * w).append(x)
        for k in class_share:
            if len(class_share[k]) < w + 1:
                class_share[k].append(0.0)
        _churn(pop, members, book, rng, w)
    return SimResult(params, members, owner_earned, pop.windows, pop.rounds_per_window, audits, class_share)


def _churn(pop: Population, members: list[Member], book: ScoreBook, rng: random.Random, w: int) -> None:
    """Replace each honest miner with probability `churn` by a newcomer of fresh speed."""
    for m in [m for m in members if m.klass == "honest" and m.left is None]:
        if rng.random() < pop.honest.churn:
            m.left = w
            book.forget(m.hotkey)
            uid = len(members) + 1
            members.append(Member(f"hk{uid:05d}", uid, "honest", pop.honest.speed.draw(rng),
                                  m.stage, joined=w + 1))


def gini(values: list[float]) -> float:
    """Gini coefficient of non-negative values (0: equal, toward 1: one takes all)."""
    xs = sorted(v for v in values if v >= 0)
    n, total = len(xs), sum(xs)
    if n == 0 or total == 0:
        return 0.0
    weighted = sum((i + 1) * x for i, x in enumerate(xs))
    return (2 * weighted) / (n * total) - (n + 1) / n
