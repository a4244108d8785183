"""Bridge settings: the run config (YAML) plus service knobs, from flags or RESBM_BRIDGE_* env."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from bridge.records import Tunables
from protocol.messages import RunConfig

__all__ = ["BridgeSettings", "load_run_config", "env_default"]


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a run config YAML file (errors name the field)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of RunConfig fields at the top level")
    return RunConfig.model_validate(data)


def env_default(name: str, default: Any) -> Any:
    """RESBM_BRIDGE_<NAME> from the environment, else `default`."""
    return os.environ.get("RESBM_BRIDGE_" + name.upper().replace("-", "_").replace(".", "_"),
                          default)


@dataclass(frozen=True)
class BridgeSettings:
    """Everything the app needs besides the chain, storage and keypair."""

    run: RunConfig
    db_path: str
    nonce_db_path: str
    tunables: Tunables = field(default_factory=Tunables)
    rate_per_second: float = 200.0     # per-hotkey token bucket refill
    rate_burst: float = 400.0
    max_body_bytes: int = 1 << 20
    metagraph_ttl: float = 5.0         # seconds a metagraph snapshot is trusted
    check_objects: bool = True         # HEAD outputs at hops/done (off only in benchmarks)
    url_ttl: float = 3600.0            # expiry of GET URLs for states and the hop log
    seed: int | None = None            # routing RNG seed (tests)
