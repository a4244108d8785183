"""Command-line flags shared by the miner and the validator, bittensor-style, with `.env` support.

Every flag can also come from the environment as RESBM_<FLAG> with dots and dashes turned into
underscores (e.g. `--wallet.name` <- RESBM_WALLET_NAME); a `.env` file in the working directory (or
the one named by `--env-file`) is read first. Command-line values win over the environment.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from protocol.chain.open import load_hotkey, open_chain as open_network

__all__ = ["base_parser", "parse_args", "env_name", "load_keypair", "open_chain", "setup_logging"]


def env_name(flag: str) -> str:
    """Environment variable that can set `flag` (e.g. `wallet.name` -> RESBM_WALLET_NAME)."""
    return "RESBM_" + flag.replace(".", "_").replace("-", "_").upper()


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """Parser with the flags every neuron takes."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--env-file", default=".env", help="file of RESBM_* settings read before flags")
    p.add_argument("--wallet.name", default="default", help="bittensor wallet (coldkey) name")
    p.add_argument("--wallet.hotkey", default="default", help="hotkey name inside the wallet")
    p.add_argument("--wallet.path", default=str(Path.home() / ".bittensor" / "wallets"),
                   help="directory holding bittensor wallets")
    p.add_argument("--netuid", type=int, default=9, help="subnet uid")
    p.add_argument("--subtensor.network", default="finney",
                   help="finney, test, local, a ws(s):// URL, or localchain:PATH for a local SQLite chain")
    p.add_argument("--bridge.url", default="http://127.0.0.1:8080", help="bridge base URL")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--link.mbps", type=float, default=0.0,
                   help="emulate an uplink/downlink of this many Mbit/s for object transfers (0 = off)")
    p.add_argument("--link.latency-ms", type=float, default=0.0,
                   help="emulated one-way latency added to every object transfer")
    p.add_argument("--logging.debug", action="store_true", help="verbose logging")
    p.add_argument("--status-every", type=float, default=10.0, help="seconds between status lines")
    p.add_argument("--metrics.port", type=int, default=0,
                   help="serve Prometheus metrics on this port at /metrics (0 = off)")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags after applying `.env` and RESBM_* environment defaults."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env_file = _flag_value(argv, "--env-file") or ".env"
    if Path(env_file).is_file():
        from dotenv import load_dotenv
        load_dotenv(env_file, override=False)
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0].lstrip("-")
        value = os.environ.get(env_name(flag))
        if value is None:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            action.default = value.lower() in ("1", "true", "yes", "on")
        else:
            action.default = action.type(value) if action.type else value
    return parser.parse_args(argv)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def load_keypair(args: argparse.Namespace):
    """The hotkey of the configured wallet; exits with a readable message when it is missing."""
    return load_hotkey(getattr(args, "wallet.name"), getattr(args, "wallet.hotkey"), getattr(args, "wallet.path"))


def open_chain(args: argparse.Namespace):
    """The `Chain` named by --subtensor.network and --netuid."""
    return open_network(getattr(args, "subtensor.network"), args.netuid)


def setup_logging(debug: bool, name: str) -> logging.Logger:
    """One readable line per event on stderr."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger(name)
