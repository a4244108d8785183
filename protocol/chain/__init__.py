"""The `Chain` interface and its backends: `LocalChain` (SQLite) and `BittensorChain` (SDK)."""
from protocol.chain.base import Chain, ChainFailure, MetagraphView, NeuronInfo, SetWeightsResult
from protocol.chain.bittensor_chain import BittensorChain
from protocol.chain.local import LocalChain

__all__ = [
    "BittensorChain",
    "Chain",
    "ChainFailure",
    "LocalChain",
    "MetagraphView",
    "NeuronInfo",
    "SetWeightsResult",
]
