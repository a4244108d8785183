"""`python -m bridge`: serve the bridge with uvicorn (flags, or RESBM_BRIDGE_* environment)."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Optional

from bridge.records import Tunables
from bridge.settings import BridgeSettings, env_default, load_run_config
from protocol.chain.open import load_hotkey, open_chain

__all__ = ["main", "build_parser", "load_keypair"]

log = logging.getLogger("bridge")


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; each defaults to its RESBM_BRIDGE_* variable."""
    p = argparse.ArgumentParser(prog="python -m bridge", description=__doc__)
    a = p.add_argument
    e = env_default
    a("--run-config", default=e("run_config", None), help="run config YAML (RunConfig fields)")
    a("--host", default=e("host", "127.0.0.1"), help="listen address")
    a("--port", type=int, default=int(e("port", 8600)), help="listen port")
    a("--db", default=e("db", "bridge.sqlite"), help="SQLite state file (resumes if present)")
    a("--s3-endpoint", default=e("s3_endpoint", None), help="S3 endpoint URL")
    a("--s3-bucket", default=e("s3_bucket", "resbm"), help="bucket (created if missing)")
    a("--s3-access-key", default=e("s3_access_key", None), help="S3 access key")
    a("--s3-secret-key", default=e("s3_secret_key", None), help="S3 secret key")
    a("--chain", default=e("chain", None),
      help="localchain:PATH (a LocalChain file; local:PATH also works) | finney | test | ws://...")
    a("--netuid", type=int, default=int(e("netuid", 1)), help="subnet id")
    a("--wallet.name", dest="wallet_name", default=e("wallet.name", None), help="wallet name")
    a("--wallet.hotkey", dest="wallet_hotkey", default=e("wallet.hotkey", "default"),
      help="wallet hotkey name")
    a("--wallet.path", dest="wallet_path", default=e("wallet.path", None), help="wallets dir")
    a("--hotkey-uri", default=e("hotkey_uri", None),
      help="derive the bridge hotkey from a URI such as //bridge (local runs only)")
    a("--rate", type=float, default=float(e("rate", 200.0)), help="requests/s per hotkey")
    a("--health-timeout", type=float, default=float(e("health_timeout", 120.0)),
      help="seconds without contact before a miner counts as gone")
    a("--no-head-check", action="store_true",
      help="skip HEAD of hop outputs at hops/done (benchmarks only: trusts miners)")
    a("--seed", type=int, default=None, help="routing RNG seed (tests)")
    a("--log-level", default=e("log_level", "INFO"), help="logging level")
    return p


def load_keypair(args: argparse.Namespace) -> Any:
    """The bridge's hotkey keypair from --hotkey-uri or a wallet."""
    return load_hotkey(args.wallet_name, args.wallet_hotkey, args.wallet_path, uri=args.hotkey_uri)


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags, open chain and storage, serve."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for need in ("run_config", "chain"):
        if not getattr(args, need):
            raise SystemExit(f"--{need.replace('_', '-')} is required")
    import uvicorn

    from bridge.app import create_app
    from bridge.storage import Storage
    run = load_run_config(args.run_config)
    storage = None
    if args.s3_endpoint:
        storage = Storage(args.s3_endpoint, args.s3_bucket, args.s3_access_key or "",
                          args.s3_secret_key or "")
    elif not args.no_head_check:
        raise SystemExit("--s3-endpoint is required (or --no-head-check for benchmarks)")
    settings = BridgeSettings(
        run=run, db_path=args.db, nonce_db_path=os.fspath(args.db) + ".nonces",
        tunables=Tunables(health_timeout=args.health_timeout), rate_per_second=args.rate,
        rate_burst=2 * args.rate, check_objects=not args.no_head_check, seed=args.seed)
    try:
        app = create_app(settings, open_chain(args.chain, args.netuid), storage, load_keypair(args))
    except ValueError as exc:  # a dataset (DatasetConfigError) or model the run cannot use
        raise SystemExit(f"bridge: {args.run_config}: {exc}") from None
    log.info("bridge for run %s on %s:%d", run.run_id, args.host, args.port)
    if (run.sync_codec, run.sync_merged_codec, run.sync_shards) != ("fp32", "fp32", 1):
        log.warning("run config: sync_codec/sync_merged_codec/sync_shards only shape the shard plan "
                    "(GET .../shards) so far; rounds still merge whole fp32 states (docs/CONTRACTS.md)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
