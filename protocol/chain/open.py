"""Open a `Chain` and a hotkey from the flags every process takes (bridge, miner, validator),
and check them at start: each mistake becomes a `Misconfigured` with one line and its exit code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from protocol.chain.base import Chain, ChainFailure, MetagraphView
from protocol.exits import Exit, Misconfigured

__all__ = ["LOCAL_PREFIXES", "NETWORKS", "open_chain", "load_hotkey", "load_wallet",
           "check_subnet", "check_registered"]

LOCAL_PREFIXES = ("localchain:", "local:")
"""`localchain:PATH` (or the short `local:PATH`) names a LocalChain SQLite file; plain `local` is a
local subtensor node, as in bittensor."""

NETWORKS = ("finney", "test", "local")


def open_chain(network: str, netuid: int, create: bool = False) -> Chain:
    """LocalChain for `localchain:PATH` (the file must exist unless `create`); BittensorChain for
    finney, test, local and ws(s):// URLs. Unknown names raise `Misconfigured`."""
    for prefix in LOCAL_PREFIXES:
        if network.startswith(prefix):
            path = network[len(prefix):]
            if not create and not Path(path).is_file():
                raise Misconfigured(Exit.LOCALCHAIN_MISSING, (
                    f"local chain file {path!r} does not exist; create it with "
                    f"`python -m protocol.chain.local_cli --db {path} --netuid {netuid} create --owner //owner` "
                    "or fix the path"))
            import sqlite3

            from protocol.chain.local import LocalChain
            try:
                return LocalChain(path, netuid=netuid)
            except sqlite3.DatabaseError as exc:
                raise Misconfigured(Exit.LOCALCHAIN_MISSING, (
                    f"{path!r} is not a local chain file ({exc}); give the file made by "
                    "`python -m protocol.chain.local_cli create`")) from None
    if network not in NETWORKS and not network.startswith(("ws://", "wss://")):
        raise Misconfigured(Exit.NETWORK_NAME, (
            f"unknown network {network!r}; use finney, test, local, a ws(s):// URL, "
            "or localchain:PATH"))
    from protocol.chain.bittensor_chain import BittensorChain
    return BittensorChain(network=network, netuid=netuid)


def check_subnet(chain: Chain, network: str, netuid: int) -> MetagraphView:
    """The subnet's metagraph; `Misconfigured` when the chain does not answer or has no such subnet."""
    try:
        return chain.metagraph()
    except ChainFailure as exc:
        raise Misconfigured(Exit.NETUID, f"{exc}; check --netuid (now {netuid}) and "
                            f"--subtensor.network (now {network})") from None
    except Exception as exc:  # noqa: BLE001 - the SDK raises many types when no node answers
        hint = (" (start a subtensor node, or use localchain:PATH for a file-backed chain)"
                if network == "local" else "")
        first = (str(exc).splitlines() or [""])[0][:300]
        raise Misconfigured(Exit.CHAIN_UNREACHABLE, (
            f"no chain node answers for {network!r} ({type(exc).__name__}: {first}){hint}; "
            "check --subtensor.network / --subtensor.chain_endpoint")) from None


def check_registered(mg: MetagraphView, hotkey: str, network: str, netuid: int,
                     need_permit: bool = False) -> int:
    """The hotkey's uid; `Misconfigured` when it is not registered (or lacks a needed permit)."""
    neuron = next((n for n in mg.neurons if n.hotkey == hotkey), None)
    if neuron is None:
        raise Misconfigured(Exit.NOT_REGISTERED, (
            f"hotkey {hotkey} is not registered on netuid {netuid} ({network}); register it "
            "(btcli subnets register, or local_cli register on a local chain) and start again"))
    if need_permit and not neuron.validator_permit:
        raise Misconfigured(Exit.NO_PERMIT, (
            f"hotkey {hotkey} (uid {neuron.uid}) has no validator permit on netuid {netuid}; "
            "permits go to the top hotkeys by stake: add stake (btcli stake add, or local_cli stake) "
            "and start again"))
    return neuron.uid


def load_wallet(wallet_name: str, wallet_hotkey: str = "default",
                wallet_path: Optional[str] = None) -> Any:
    """A bittensor Wallet whose hotkey file exists; `Misconfigured` otherwise."""
    import bittensor
    kw: dict[str, Any] = {"name": wallet_name, "hotkey": wallet_hotkey}
    if wallet_path:
        kw["path"] = os.path.expanduser(wallet_path)
    where = f" under {wallet_path}" if wallet_path else ""
    wallet = bittensor.Wallet(**kw)
    if not Path(wallet.hotkey_file.path).is_file():
        raise Misconfigured(Exit.WALLET, (
            f"hotkey {wallet_hotkey!r} of wallet {wallet_name!r} not found{where} "
            f"(no file {wallet.hotkey_file.path}); create it with `btcli wallet new-hotkey "
            f"--wallet {wallet_name} --wallet-hotkey {wallet_hotkey}` or fix --wallet.path"))
    return wallet


def load_hotkey(wallet_name: str, wallet_hotkey: str = "default", wallet_path: Optional[str] = None,
                uri: Optional[str] = None) -> Any:
    """The hotkey of a bittensor wallet on disk (or of a //URI, for local runs); `Misconfigured`
    when it cannot be read."""
    from bittensor.sp_core import Keypair
    if uri:
        return Keypair.create_from_uri(uri)
    if not wallet_name:
        raise Misconfigured(Exit.WALLET,
                            "give --wallet.name (and --wallet.hotkey), or a //URI hotkey for local runs")
    wallet = load_wallet(wallet_name, wallet_hotkey, wallet_path)
    try:
        return wallet.hotkey
    except Exception as exc:  # the SDK raises several types for locked or corrupt key files
        raise Misconfigured(Exit.WALLET, f"cannot read hotkey {wallet_hotkey!r} of wallet "
                            f"{wallet_name!r}: {exc}; recreate it with btcli") from None
