"""Bridge settings: the process's flags (`BridgeConfig`, the one scheme of `protocol.settings`:
flag > RESBM_* environment > .env > default), the run config (YAML) and the app's knobs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import yaml
from pydantic import ValidationError, field_validator

from bridge.records import Tunables
from protocol.exits import Exit, Misconfigured
from protocol.messages import RunConfig
from protocol.settings import DEFAULT_BRIDGE_PORT, CommonSettings, flag
from spec.model_config import ModelConfig

__all__ = ["BridgeConfig", "BridgeSettings", "load_run_config", "check_model"]


class BridgeConfig(CommonSettings):
    """The bridge process's settings (flags, RESBM_* variables, .env)."""

    run_config: str = flag("", "run config YAML (RunConfig fields; see run.example.yaml)")
    host: str = flag("127.0.0.1", "listen address")
    port: int = flag(DEFAULT_BRIDGE_PORT, "listen port")
    db: str = flag("bridge.sqlite", "state database: a SQLite file (resumes if present; one bridge "
                   "process) or a postgresql:// URL (several bridge processes may share it)")
    s3_endpoint: str = flag("", "S3 endpoint URL (AWS, R2, MinIO, rclone serve s3)")
    s3_bucket: str = flag("resbm", "bucket (created if missing)")
    s3_access_key: str = flag("", "S3 access key")
    s3_secret_key: str = flag("", "S3 secret key")
    s3_wait: float = flag(300.0, "seconds to keep retrying an unreachable S3 endpoint at start",
                          name="s3-wait")
    hotkey_uri: str = flag("", "derive the bridge hotkey from a URI such as //bridge (local runs only)")
    rate: float = flag(200.0, "requests/s per hotkey")
    unknown_rate: float = flag(20.0, "requests/s from all hotkeys the metagraph does not list, together, that "
                               "get a signature check (each such hotkey: a tenth of it); the rest get 429")
    health_timeout: float = flag(120.0, "seconds without contact before a miner counts as gone")
    keep_rounds: int = flag(8, "rounds of hop rows kept in the database for validators' hop logs "
                            "(at least the run's audit_window_rounds + 1; older ones are pruned)")
    no_head_check: bool = flag(False, "skip HEAD of hop outputs at hops/done (benchmarks only: trusts miners)")
    seed: Optional[int] = flag(None, "routing RNG seed (tests)")
    slow_factor: float = flag(2.0, "route around slow replicas: a replica whose next hop would finish this "
                              "many times later than on its stage's soonest peer gets no new work (>= 1; "
                              "0 turns routing by measured hop time off)")

    tick_seconds: float = flag(0.5, "seconds between the bridge's clock ticks, which apply lease expiries "
                               "and merge and vote deadlines when no request comes (0: only requests do)")

    @field_validator("tick_seconds")
    @classmethod
    def _tick_seconds(cls, v: float) -> float:
        if not 0 <= v <= 60:
            raise ValueError("must be between 0 (no clock) and 60 seconds")
        return v

    @field_validator("slow_factor")
    @classmethod
    def _slow_factor(cls, v: float) -> float:
        if v != 0 and not v >= 1:
            raise ValueError("must be 0 (off) or at least 1 (a factor below 1 would refuse even the "
                             "fastest replica)")
        return v


def load_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a run config YAML file; `Misconfigured` (one line) when it is missing or bad."""
    if not path:
        raise Misconfigured(Exit.CONFIG_FILE, "no run config: give --run-config FILE (start from "
                            "run.example.yaml)")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise Misconfigured(Exit.CONFIG_FILE, f"run config {path} does not exist; give an existing "
                            "--run-config FILE (start from run.example.yaml)") from None
    except (OSError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Misconfigured(Exit.CONFIG_FILE, f"run config {path} cannot be read: {first}") from None
    if not isinstance(data, dict):
        raise Misconfigured(Exit.CONFIG_FILE,
                            f"run config {path}: expected a mapping of RunConfig fields at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(map(str, e["loc"])) or "(top level)"
        raise Misconfigured(Exit.CONFIG_FILE, f"run config {path}: {where}: {e['msg']} "
                            f"({exc.error_count()} error(s)); fix the file") from None


def check_model(run: RunConfig, path: str) -> None:
    """Build the run's ModelConfig as miners will; `Misconfigured` when it is invalid (otherwise
    every miner would fail on its first assignment)."""
    try:
        ModelConfig.from_dict(dict(run.model)).validate()
    except (ValueError, TypeError) as exc:
        raise Misconfigured(Exit.CONFIG_FILE, f"run config {path}: model: {exc}") from None


@dataclass(frozen=True)
class BridgeSettings:
    """Everything the app needs besides the chain, storage and keypair."""

    run: RunConfig
    db_path: str                       # SQLite file, or a postgresql:// URL
    nonce_db_path: str                 # SQLite only (PostgreSQL keeps nonces in the database)
    tunables: Tunables = field(default_factory=Tunables)
    rate_per_second: float = 200.0     # per-hotkey token bucket refill
    rate_burst: float = 400.0
    unknown_rate: float = 20.0         # signature checks/s for unregistered hotkeys (bridge.auth)
    max_body_bytes: int = 1 << 20
    metagraph_ttl: float = 5.0         # seconds a metagraph snapshot is trusted
    check_objects: bool = True         # HEAD outputs at hops/done (off only in benchmarks)
    url_ttl: float = 3600.0            # expiry of GET URLs for states and the hop log
    seed: int | None = None            # routing RNG seed (tests)
    netuid: int | None = None          # served in GET /health so neurons can check theirs
    keep_rounds: int = 8               # rounds of hop rows kept in SQLite (older are pruned)
    tick_seconds: float = 0.5          # the clock: time's transitions with no request (0: never)
