"""`ValidatorSettings`: the knobs of the validator loop, declared once.

`neurons.validator.ValidatorConfig` adds them to the neuron's flags (so each is a flag and a
RESBM_ variable); tests and tools build this model directly. How validators score (audit rate,
burn share, smoothing, penalties) is not here: validators must agree on it, so it is the run
config's `incentives` (protocol/incentives.py), which the bridge serves to every validator."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict

from protocol.settings import flag

__all__ = ["INCENTIVE_FLAGS", "ValidatorSettings"]

_WHERE = ("validators must agree on it, so it is the run config's incentives.{field} (set by the subnet "
          "owner in the bridge's run config; docs/CONSOLE.md)")
INCENTIVE_FLAGS = {flag_name: _WHERE.format(field=field) for flag_name, field in (
    ("audit.fraction", "audit_fraction"), ("burn-share", "burn_share"), ("ema-alpha", "ema_alpha"),
    ("penalty-windows", "penalty_windows"))}
"""Validator flags that moved into the run config's incentives -> the one line that says so."""


class ValidatorSettings(BaseModel):
    """Knobs of the validator loop (each also a resbm-validator flag)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    state_path: str = flag("validator_state.json", "where scores and progress persist (JSON)")
    audit_max_seconds: float = flag(120.0, "compute budget of one audited miner-round; "
                                    "past it the audit is 'incomplete'", name="audit.max-seconds")
    poll_seconds: float = flag(2.0, "how often to poll the bridge")
    seed: Optional[int] = flag(None, "fix the audit choice (tests only)")
    device: str = flag("cpu", "where audits replay miners' work")
