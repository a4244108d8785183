"""The `Chain` interface every backend implements, and the frozen records it returns."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Chain", "ChainFailure", "MetagraphView", "NeuronInfo", "SetWeightsResult"]

SetWeightsStatus = Literal["ok", "rate_limited", "not_registered", "error"]


class ChainFailure(Exception):
    """A chain operation failed (not registered, subnet missing, extrinsic rejected)."""


@dataclass(frozen=True)
class NeuronInfo:
    """One registered neuron as seen in a metagraph."""

    uid: int
    hotkey: str
    coldkey: str
    stake: float
    validator_permit: bool
    last_update: int
    axon_ip: str | None
    axon_port: int | None


@dataclass(frozen=True)
class MetagraphView:
    """A subnet's neurons at one block; `neurons` is ordered by uid."""

    netuid: int
    block: int
    tempo: int
    owner_hotkey: str
    neurons: tuple[NeuronInfo, ...]

    def uid_of(self, hotkey: str) -> int | None:
        """The uid registered under `hotkey`, or None."""
        n = self.by_hotkey(hotkey)
        return None if n is None else n.uid

    def by_hotkey(self, hotkey: str) -> NeuronInfo | None:
        """The neuron registered under `hotkey`, or None."""
        for n in self.neurons:
            if n.hotkey == hotkey:
                return n
        return None

    @property
    def validators(self) -> tuple[NeuronInfo, ...]:
        """Neurons holding a validator permit."""
        return tuple(n for n in self.neurons if n.validator_permit)


@dataclass(frozen=True)
class SetWeightsResult:
    """Outcome of a weight submission; `blocks_left` is set when rate limited."""

    status: SetWeightsStatus
    blocks_left: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the weights were accepted."""
        return self.status == "ok"


class Chain(ABC):
    """One subnet on one chain. `keypair` arguments accept a bittensor Keypair or Wallet."""

    netuid: int

    @abstractmethod
    def current_block(self) -> int:
        """The current block number."""

    @abstractmethod
    def metagraph(self) -> MetagraphView:
        """The subnet's neurons at the current block."""

    @abstractmethod
    def uid_of(self, hotkey: str) -> int | None:
        """The uid of a hotkey on this subnet, or None when not registered."""

    @abstractmethod
    def register(self, keypair: Any) -> int:
        """Register the keypair's hotkey (idempotent); returns its uid."""

    @abstractmethod
    def serve(self, keypair: Any, ip: str, port: int) -> None:
        """Publish the hotkey's axon endpoint; raises ChainFailure when not registered."""

    @abstractmethod
    def set_weights(self, keypair: Any, uids: list[int], weights: list[float],
                    version_key: int = 0) -> SetWeightsResult:
        """Set the hotkey's weights; never raises for rate limits or missing registration."""

    @abstractmethod
    def weights_rate_limit(self) -> int:
        """Blocks a hotkey must wait between weight sets."""

    @abstractmethod
    def blocks_since_last_update(self, hotkey: str) -> int | None:
        """Blocks since the hotkey last set weights (None when not registered)."""

    @abstractmethod
    def weights_of(self, hotkey: str) -> dict[int, float]:
        """The weights the hotkey set, read back from chain, as {uid: fraction} summing to 1."""

    @abstractmethod
    def owner_hotkey(self) -> str:
        """The subnet owner's hotkey."""


def hotkey_ss58(keypair: Any) -> str:
    """The hotkey address of a Keypair, Wallet or Signer."""
    hotkey = getattr(keypair, "hotkey", None)
    if hotkey is not None and not isinstance(hotkey, str):
        return hotkey.ss58_address
    return keypair.ss58_address


def coldkey_ss58(keypair: Any) -> str:
    """The coldkey address of a Wallet (public view), or the keypair's own address."""
    pub = getattr(keypair, "coldkeypub", None)
    if pub is not None:
        return pub.ss58_address
    return keypair.ss58_address
