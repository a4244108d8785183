"""ResBM model library: config, transformer blocks, bottleneck boundaries, stage split, wire codec,
optimizers, outer (merge) step, deterministic offline data and the single-process reference trainer.

Imports only torch, numpy and safetensors; nothing here touches the network or the chain.
"""
