"""`BittensorChain`: the `Chain` interface on the bittensor 11 SDK (`SyncClient` + intents).

Weight normalisation, max-weight clipping, u16 quantisation and commit-reveal are left to
`bittensor.SetWeights`. Nothing connects until the first method call.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from protocol.chain.base import (
    Chain,
    ChainFailure,
    MetagraphView,
    NeuronInfo,
    SetWeightsResult,
    hotkey_ss58,
)

__all__ = ["BittensorChain"]

log = logging.getLogger(__name__)

NETWORKS = ("finney", "test", "local")


def _check_network(network: str) -> str:
    if network in NETWORKS or network.startswith(("ws://", "wss://")):
        return network
    raise ValueError(f"network must be one of {', '.join(NETWORKS)} or a ws(s):// URL, "
                     f"got {network!r}")


class BittensorChain(Chain):
    """One subnet on finney, test, a local subtensor, or any ws(s):// endpoint."""

    def __init__(self, network: str, netuid: int, substrate: Any = None) -> None:
        self.network = _check_network(network)
        self.netuid = int(netuid)
        self._substrate = substrate
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The SDK's `SyncClient`, built on first use."""
        with self._lock:
            if self._client is None:
                import bittensor as bt  # deferred so importing this module stays cheap

                self._client = bt.SyncClient(self.network, substrate=self._substrate)
            return self._client

    def close(self) -> None:
        """Close the SDK client and its background loop."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- reads ------------------------------------------------------------------------------

    def current_block(self) -> int:
        """The current block number."""
        return int(self.client.block)

    def metagraph(self) -> MetagraphView:
        """The subnet's neurons at the current block."""
        mg = self.client.subnets.metagraph(self.netuid, commitments=False)
        if mg is None:
            raise ChainFailure(f"subnet {self.netuid} does not exist on {self.network}")
        neurons = tuple(_neuron(n) for n in mg.neurons)
        return MetagraphView(netuid=self.netuid, block=int(mg.block), tempo=int(mg.tempo),
                             owner_hotkey=str(mg.owner_hotkey), neurons=neurons)

    def uid_of(self, hotkey: str) -> int | None:
        """The uid of a hotkey on this subnet, or None."""
        uid = self.client.neurons.uid(hotkey, self.netuid)
        return None if uid is None else int(uid)

    def weights_rate_limit(self) -> int:
        """Blocks a hotkey must wait between weight sets."""
        return int(self.client.hyperparameters.weights_rate_limit(self.netuid))

    def blocks_since_last_update(self, hotkey: str) -> int | None:
        """Blocks since the hotkey last set weights (None when not registered)."""
        uid = self.uid_of(hotkey)
        if uid is None:
            return None
        value = self.client.epochs.blocks_since_last_update(self.netuid, uid)
        return None if value is None else int(value)

    def weights_of(self, hotkey: str) -> dict[int, float]:
        """The weights the hotkey set, as {uid: fraction} (rows revealed so far)."""
        uid = self.uid_of(hotkey)
        if uid is None:
            return {}
        rows = self.client.weights.weights(self.netuid)
        return {int(k): float(v) for k, v in rows.get(uid, {}).items()}

    def owner_hotkey(self) -> str:
        """The subnet owner's hotkey."""
        return self.metagraph().owner_hotkey

    # -- writes -----------------------------------------------------------------------------

    def register(self, keypair: Any) -> int:
        """Burned-register a wallet's hotkey, paid and signed by its coldkey (idempotent); returns
        its uid. `keypair` must be wallet-shaped (coldkey + hotkey): a bare keypair is refused,
        since the SDK would sign the coldkey extrinsic with it and charge the hotkey."""
        import bittensor as bt

        hotkey = hotkey_ss58(keypair)
        uid = self.uid_of(hotkey)
        if uid is not None:
            return uid
        if not all(hasattr(keypair, k) for k in ("coldkey", "coldkeypub", "hotkey")):
            raise ChainFailure(f"registering {hotkey} needs a wallet (coldkey pays the burn, "
                               "hotkey is registered), not a bare keypair")
        result = self.client.execute(bt.BurnedRegister(netuid=self.netuid, hotkey_ss58=hotkey),
                                     keypair)  # wallet-shaped: the SDK signs with its coldkey
        if not result.success:
            raise ChainFailure(f"registering {hotkey} on subnet {self.netuid} failed: "
                               f"{result.message}")
        uid = self.uid_of(hotkey)
        if uid is None:
            raise ChainFailure(f"registration of {hotkey} succeeded but no uid is visible yet")
        log.info("registered %s as uid %d on subnet %d", hotkey, uid, self.netuid)
        return uid

    def serve(self, keypair: Any, ip: str, port: int) -> None:
        """Publish the hotkey's axon endpoint."""
        import bittensor as bt
        from bittensor.result import ChainError

        try:
            result = self.client.execute(bt.ServeAxon(netuid=self.netuid, ip=ip, port=int(port)),
                                         keypair)
        except ChainError as exc:
            raise ChainFailure(f"serve_axon failed: {exc}") from exc
        if not result.success:
            raise ChainFailure(f"serve_axon failed: {result.message}")

    def set_weights(self, keypair: Any, uids: list[int], weights: list[float],
                    version_key: int = 0) -> SetWeightsResult:
        """Submit weights through `bittensor.SetWeights`; rate limits come back as a status."""
        import bittensor as bt
        from bittensor.result import BittensorError, ChainError, ErrorCode

        hotkey = hotkey_ss58(keypair)
        try:
            intent = bt.SetWeights(netuid=self.netuid, uids=[int(u) for u in uids],
                                   weights=[float(w) for w in weights],
                                   version_key=int(version_key))
            result = self.client.execute(intent, keypair)
        except ChainError as exc:
            return self._weights_failure(hotkey, exc.code, str(exc))
        except BittensorError as exc:
            return SetWeightsResult("error", 0, str(exc))
        if result.success:
            return SetWeightsResult("ok", 0, result.message or "weights set")
        code = result.error.code if result.error is not None else ErrorCode.UNKNOWN
        return self._weights_failure(hotkey, code, result.message)

    def _weights_failure(self, hotkey: str, code: Any, message: str) -> SetWeightsResult:
        from bittensor.result import ErrorCode

        if code == ErrorCode.NOT_REGISTERED:
            return SetWeightsResult("not_registered", 0, message)
        if code == ErrorCode.RATE_LIMITED:
            since = self.blocks_since_last_update(hotkey) or 0
            left = max(1, self.weights_rate_limit() - since)
            return SetWeightsResult("rate_limited", left, message)
        return SetWeightsResult("error", 0, message)


def _neuron(n: Any) -> NeuronInfo:
    ip, port = None, None
    if n.axon:
        host, _, port_s = n.axon.rpartition(":")
        ip, port = host.strip("[]"), int(port_s)
    return NeuronInfo(uid=int(n.uid), hotkey=str(n.hotkey), coldkey=str(n.coldkey),
                      stake=int(n.total_stake.rao) / 1e9, validator_permit=bool(n.validator_permit),
                      last_update=int(n.last_update), axon_ip=ip, axon_port=port)
