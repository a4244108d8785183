"""`python -m bridge`: serve the bridge with uvicorn.

Settings come from flags, RESBM_* environment variables or a .env file (flag > environment >
.env > default; `--help` lists them). Every start-up mistake ends in one line and an exit code
from `protocol.exits.Exit`; an S3 endpoint that does not answer yet is retried with back-off.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

from bridge.db import is_postgres_url
from bridge.records import Tunables
from bridge.settings import BridgeConfig, BridgeSettings, check_model, load_run_config
from protocol.chain.open import check_subnet, load_hotkey, open_chain
from protocol.exits import Exit, Misconfigured, Transient, exits_cleanly, retry
from protocol.settings import build_parser as settings_parser
from protocol.settings import load_settings, setup_logging

__all__ = ["main", "build_parser", "load_keypair", "open_storage"]

DESCRIPTION = "Serve the ResBM bridge: coordination of miners and validators over S3."

# Old spellings still accepted, so existing scripts keep working.
_ALIASES = {"--chain": "--subtensor.network", "--log-level": None}


def build_parser() -> Any:
    """Command-line flags (generated from `BridgeConfig`)."""
    return settings_parser(BridgeConfig, "python -m bridge", DESCRIPTION)


def _translate(argv: list[str]) -> list[str]:
    """Map the deprecated `--chain X` to `--subtensor.network X`; `--log-level DEBUG` to `--logging.debug`."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, val = a.partition("=")
        if name in _ALIASES:
            if not eq:
                i += 1
                val = argv[i] if i < len(argv) else ""
            if name == "--chain":
                out += ["--subtensor.network", val]
            elif val.upper() == "DEBUG":
                out.append("--logging.debug")
        else:
            out.append(a)
        i += 1
    return out


def load_keypair(cfg: BridgeConfig) -> Any:
    """The bridge's hotkey keypair from --hotkey-uri or a wallet."""
    return load_hotkey(cfg.wallet_name, cfg.wallet_hotkey, cfg.wallet_path, uri=cfg.hotkey_uri or None)


def _try_storage(cfg: BridgeConfig) -> Any:
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

    from bridge.storage import Storage
    unreachable = Misconfigured(Exit.S3_UNREACHABLE, (
        f"no S3 server answers at {cfg.s3_endpoint}; check --s3-endpoint and that the server runs"))
    try:
        return Storage(cfg.s3_endpoint, cfg.s3_bucket, cfg.s3_access_key, cfg.s3_secret_key)
    except EndpointConnectionError as exc:
        raise Transient(f"no answer ({type(exc).__name__})", unreachable) from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code, status = str(err.get("Code", "")), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403",
                    "InvalidToken", "ExpiredToken") or status == 403:
            raise Misconfigured(Exit.S3_CREDENTIALS, (
                f"S3 at {cfg.s3_endpoint} rejected the credentials ({code or status}); check "
                "--s3-access-key and --s3-secret-key")) from None
        if status in (500, 502, 503, 504):
            raise Transient(f"HTTP {status}", unreachable) from None
        raise Misconfigured(Exit.S3_UNREACHABLE, (
            f"S3 at {cfg.s3_endpoint} refused bucket {cfg.s3_bucket!r}: {code} {err.get('Message', '')}; "
            "check --s3-bucket and the key's permissions")) from None
    except (BotoCoreError, ValueError) as exc:
        if "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            raise Transient(f"no answer ({type(exc).__name__})", unreachable) from None
        raise Misconfigured(Exit.S3_UNREACHABLE,
                            f"--s3-endpoint {cfg.s3_endpoint!r} is unusable: {exc}") from None


def open_storage(cfg: BridgeConfig, log: logging.Logger) -> Any:
    """The bucket's `Storage`, retrying an endpoint that does not answer yet (up to --s3.wait s)."""
    return retry(f"S3 {cfg.s3_endpoint}", lambda: _try_storage(cfg), log, cfg.s3_wait,
                 first=1.0, cap=30.0)


def check_postgres(url: str) -> None:
    """`Misconfigured` (one line) when a postgresql:// --db cannot be used: psycopg missing, or
    the server does not answer or refuses us."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError:
        raise Misconfigured(Exit.DATABASE, "--db postgresql://... needs psycopg 3 and "
                            "psycopg_pool: pip install 'resbm-subnet[postgres]'") from None
    from bridge.db_postgres import DatabaseUnavailable, first_line, redact
    try:
        psycopg.connect(url, connect_timeout=10).close()
    except (psycopg.Error, DatabaseUnavailable) as exc:
        raise Misconfigured(Exit.DATABASE, f"PostgreSQL at {redact(url)}: {first_line(exc)}; "
                            "check --db and that the server runs and accepts this user") from None


@exits_cleanly
def main(argv: Optional[list[str]] = None) -> int:
    """Check the settings, open chain and storage, serve."""
    import sys
    argv = _translate(list(sys.argv[1:] if argv is None else argv))
    cfg = load_settings(BridgeConfig, argv, prog="python -m bridge", description=DESCRIPTION)
    log = setup_logging(cfg, "bridge")
    run = load_run_config(cfg.run_config)
    if not cfg.s3_endpoint and not cfg.no_head_check:
        raise Misconfigured(Exit.USAGE, "--s3-endpoint is required (or --no-head-check for benchmarks)")
    postgres = is_postgres_url(cfg.db)
    if postgres:
        check_postgres(cfg.db)  # before the slower checks: a wrong URL is told at once
    keypair = load_keypair(cfg)
    chain = open_chain(cfg.network, cfg.netuid)
    check_subnet(chain, cfg.network, cfg.netuid)
    storage = open_storage(cfg, log) if cfg.s3_endpoint else None
    if postgres or not os.path.exists(cfg.db):  # a resumed SQLite file holds this same run
        check_model(run, cfg.run_config)
    import uvicorn

    from bridge.app import create_app
    settings = BridgeSettings(
        run=run, db_path=cfg.db, nonce_db_path=os.fspath(cfg.db) + ".nonces",
        tunables=Tunables(health_timeout=cfg.health_timeout, route_by_speed=cfg.slow_factor > 0,
                          slow_factor=cfg.slow_factor or 2.0), rate_per_second=cfg.rate,
        rate_burst=2 * cfg.rate, unknown_rate=cfg.unknown_rate, check_objects=not cfg.no_head_check, seed=cfg.seed,
        netuid=cfg.netuid, keep_rounds=max(cfg.keep_rounds, run.audit_window_rounds + 1),
        tick_seconds=cfg.tick_seconds)
    try:
        app = create_app(settings, chain, storage, keypair)
    except ValueError as exc:  # a dataset (DatasetConfigError) or model the run cannot use
        raise Misconfigured(Exit.CONFIG_FILE, f"{cfg.run_config}: {exc}") from None
    except RuntimeError as exc:
        if type(exc).__name__ != "DatabaseUnavailable":
            raise
        raise Misconfigured(Exit.DATABASE, f"{exc}; check --db and that the server runs and "
                            "accepts this user") from None
    log.info("bridge for run %s on %s:%d (netuid %d, %s, state in %s)", run.run_id, cfg.host,
             cfg.port, cfg.netuid, cfg.network, "PostgreSQL" if postgres else cfg.db)
    if not run.sharded and {"sync_codec", "sync_merged_codec", "sync_shards"} & run.model_fields_set:
        log.warning("run config: sync_codec/sync_merged_codec/sync_shards apply only with sync_mode: sharded; "
                    "this run merges whole fp32 states (docs/CONTRACTS.md, 'Sharded replica sync')")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info" if cfg.logging_trace else "warning",
                access_log=cfg.logging_trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
