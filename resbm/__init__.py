"""ResBM model library: config, transformer blocks, bottleneck boundaries, stage split, wire codec,
optimizers, outer (merge) step, deterministic offline data and the single-process reference trainer.

Imports only torch, numpy and safetensors; nothing here touches the network or the chain.
"""
from . import codec, data, optim, outer
from .config import ModelConfig
from .model import build_model
from .stages import build_stages

__all__ = ["ModelConfig", "build_model", "build_stages", "codec", "data", "optim", "outer"]
