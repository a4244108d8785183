"""Command line for a LocalChain file: create a subnet, register hotkeys, stake, inspect."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from protocol.chain.base import ChainFailure, hotkey_ss58
from protocol.chain.local import LocalChain
from protocol.chain.open import load_wallet
from protocol.exits import Exit, Misconfigured, exits_cleanly
from protocol.settings import DEFAULT_NETUID

__all__ = ["main", "load_key"]


def load_key(spec: str, wallet_path: str | None = None) -> Any:
    """A keypair from a dev URI (`//Alice`), a wallet (`wallet:NAME/HOTKEY`, under `wallet_path`
    or ~/.bittensor/wallets), or an ss58; `Misconfigured` when the wallet's hotkey file is missing."""
    if spec.startswith("//"):
        from bittensor.sp_core import Keypair

        return Keypair.create_from_uri(spec)
    if spec.startswith("wallet:"):
        name, _, hotkey = spec[len("wallet:"):].partition("/")
        if not name:
            raise Misconfigured(Exit.USAGE, f"{spec!r}: expected wallet:NAME/HOTKEY")
        return load_wallet(name, hotkey or "default", wallet_path)
    return _Address(spec)


class _Address:
    """A bare ss58 address standing in for both keys (local registration needs no signature)."""

    def __init__(self, ss58: str) -> None:
        if len(ss58) < 40:
            raise Misconfigured(Exit.USAGE, f"{ss58!r} is not a //URI, wallet:NAME/HOTKEY, or ss58 address")
        self.ss58_address = ss58


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m protocol.chain.local_cli", description=__doc__)
    p.add_argument("--db", required=True, help="SQLite file holding the local chain")
    p.add_argument("--netuid", type=int, default=DEFAULT_NETUID, help=f"subnet id (default {DEFAULT_NETUID})")
    p.add_argument("--wallet.path", dest="wallet_path", default=None,
                   help="wallets directory for wallet:NAME/HOTKEY keys (default ~/.bittensor/wallets)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create", help="create the subnet")
    c.add_argument("--owner", required=True, help="owner key: //URI, wallet:NAME/HOTKEY or ss58")
    c.add_argument("--tempo", type=int, default=360)
    c.add_argument("--weights-rate-limit", type=int, default=100)
    c.add_argument("--max-weight-limit", type=float, default=1.0)
    c.add_argument("--max-validators", type=int, default=64)
    c.add_argument("--seconds-per-block", type=float, default=12.0,
                   help="block time of the new chain file (small values make local runs quick)")
    r = sub.add_parser("register", help="register hotkeys")
    r.add_argument("keys", nargs="+", help="//URI, wallet:NAME/HOTKEY or ss58 address")
    s = sub.add_parser("stake", help="add stake to a registered hotkey")
    s.add_argument("key")
    s.add_argument("amount", type=float)
    a = sub.add_parser("advance", help="advance the block clock")
    a.add_argument("blocks", type=int)
    sub.add_parser("show", help="print the metagraph and incentives as JSON")
    return p


@exits_cleanly
def main(argv: list[str] | None = None) -> int:
    """Entry point: run one local-chain command; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _parser().parse_args(argv)
    if args.cmd != "create" and not Path(args.db).is_file():
        raise Misconfigured(Exit.LOCALCHAIN_MISSING, f"local chain file {args.db} does not exist; "
                            f"run `create` first or fix --db")
    if args.cmd == "create":
        owner = load_key(args.owner, args.wallet_path)  # a bad key must leave no file behind
    chain = LocalChain(args.db, args.netuid,
                       **({"seconds_per_block": args.seconds_per_block} if args.cmd == "create" else {}))
    try:
        if args.cmd == "create":
            chain.create_subnet(owner, tempo=args.tempo,
                                weights_rate_limit=args.weights_rate_limit,
                                max_weight_limit=args.max_weight_limit,
                                max_validators=args.max_validators)
        elif args.cmd == "register":
            for spec in args.keys:
                key = load_key(spec, args.wallet_path)
                print(f"{hotkey_ss58(key)} uid {chain.register(key)}")
        elif args.cmd == "stake":
            key = load_key(args.key, args.wallet_path)
            print(f"{hotkey_ss58(key)} stake {chain.add_stake(hotkey_ss58(key), args.amount)}")
        elif args.cmd == "advance":
            print(f"block {chain.advance_blocks(args.blocks)}")
        else:
            mg = chain.metagraph()
            inc = chain.incentives()
            print(json.dumps({
                "netuid": mg.netuid, "block": mg.block, "tempo": mg.tempo,
                "owner_hotkey": mg.owner_hotkey,
                "neurons": [{**n.__dict__, "incentive": round(inc.get(n.uid, 0.0), 6)}
                            for n in mg.neurons],
            }, indent=2))
    except (ChainFailure, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Misconfigured:
        raise
    finally:
        chain.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
