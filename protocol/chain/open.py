"""Open a `Chain` and a hotkey from the flags every process takes (bridge, miner, validator)."""
from __future__ import annotations

from typing import Any, Optional

from protocol.chain.base import Chain

__all__ = ["LOCAL_PREFIXES", "open_chain", "load_hotkey"]

LOCAL_PREFIXES = ("localchain:", "local:")
"""`localchain:PATH` (or the short `local:PATH`) names a LocalChain SQLite file; plain `local` is a
local subtensor node, as in bittensor."""


def open_chain(network: str, netuid: int) -> Chain:
    """LocalChain for `localchain:PATH` / `local:PATH`; BittensorChain for finney, test, local, ws(s)://."""
    for prefix in LOCAL_PREFIXES:
        if network.startswith(prefix):
            from protocol.chain.local import LocalChain
            return LocalChain(network[len(prefix):], netuid=netuid)
    from protocol.chain.bittensor_chain import BittensorChain
    return BittensorChain(network=network, netuid=netuid)


def load_hotkey(wallet_name: str, wallet_hotkey: str = "default", wallet_path: Optional[str] = None,
                uri: Optional[str] = None) -> Any:
    """The hotkey of a bittensor wallet on disk (or of a //URI, for local runs); exits with a
    readable message when the wallet cannot be read."""
    import bittensor
    from bittensor.sp_core import Keypair
    if uri:
        return Keypair.create_from_uri(uri)
    if not wallet_name:
        raise SystemExit("give --wallet.name (and --wallet.hotkey), or a //URI hotkey for local runs")
    kw = {"name": wallet_name, "hotkey": wallet_hotkey}
    if wallet_path:
        kw["path"] = wallet_path
    try:
        return bittensor.Wallet(**kw).hotkey
    except Exception as exc:  # the SDK raises several types for missing or locked key files
        raise SystemExit(f"cannot load hotkey {wallet_hotkey!r} of wallet {wallet_name!r}"
                         f"{' under ' + wallet_path if wallet_path else ''}: {exc}. "
                         f"Create it with btcli (btcli wallet new_hotkey) or pass --wallet.path.") from exc
