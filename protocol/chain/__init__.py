"""The `Chain` interface and its backends: `LocalChain` (SQLite) and `BittensorChain` (SDK)."""
from protocol.chain.base import Chain, ChainFailure, MetagraphView, NeuronInfo, SetWeightsResult
from protocol.chain.bittensor_chain import BittensorChain
from protocol.chain.local import LocalChain
from protocol.chain.open import open_chain, load_hotkey

__all__ = [
    "BittensorChain",
    "Chain",
    "ChainFailure",
    "LocalChain",
    "MetagraphView",
    "NeuronInfo",
    "SetWeightsResult",
    "load_hotkey",
    "open_chain",
]
