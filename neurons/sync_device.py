"""Where a miner runs the sharded sync's arithmetic: its GPU, when the GPU gives the CPU's bits.

At 1B parameters per stage a round's sync is some 40 passes over a 1 GB vector (encode, decode,
screen, merge, re-encode, the outer step): tens of seconds on one CPU core, milliseconds on a GPU.
Replicas vote on the sha256 of what they compute and validators recompute it on CPUs, so the GPU
may be used only if it computes the very same bits. The codec, the merge and the outer step are
element-wise IEEE operations (one per kernel), an exact block maximum and an exact sort, which a
GPU computes exactly as a CPU does; `check_same_bits` makes sure on random vectors (zeros and
rounding ties included) before the miner uses its GPU, and falls back to the CPU otherwise.
Norms are always summed on the CPU (numpy's fixed pairwise float64 sum, resbm.outer).
"""
from __future__ import annotations

import logging

import torch

from resbm.robust_merge import MergeParams
from resbm.shard_merge import apply_shard, merge_shard
from resbm.sync_codec import CODECS, Codec, decode, encode
from resbm.sync_state import pack_update

__all__ = ["check_same_bits", "pick_sync_device"]

log = logging.getLogger(__name__)


def _vector(g: torch.Generator, n: int, scale: float) -> torch.Tensor:
    x = torch.randn(n, generator=g) * scale
    x[::17] = 0.0
    x[1::23] = torch.round(x[1::23] * 4) / 4  # values that quantize onto rounding ties
    return x


def check_same_bits(device: torch.device, n: int = 50_003, seed: int = 0) -> str:
    """'' when encoding, decoding, the robust merge and the outer step on `device` give the CPU's
    bytes and values on random vectors of `n` values; otherwise what differed first."""
    g = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    for name in CODECS:
        for block in (64, 256):
            c = Codec(name, block)
            x = _vector(g, n, 1e-3)
            blob = encode(x, c)
            if encode(x.to(device), c) != blob:
                return f"encode {name}/{block}"
            if not torch.equal(decode(blob, n, c, device=device).to(cpu), decode(blob, n, c)):
                return f"decode {name}/{block}"
    params, codec = MergeParams(), Codec("int8", 256)
    for r in (1, 2, 3, 5):
        items = [(2 + i, _vector(g, n, 1e-3 * (1 + i))) for i in range(r)]
        for prev in (None, 1e-2):
            on_cpu = merge_shard(items, n, prev, params, codec)
            on_dev = merge_shard([(s, v.to(device)) for s, v in items], n, prev, params, codec)
            if on_cpu.ref != on_dev.ref or not torch.equal(on_cpu.merged, on_dev.merged.to(cpu)):
                return f"merge of {r} pieces"
            if pack_update(on_dev.merged, on_dev.ref, codec) != pack_update(on_cpu.merged, on_cpu.ref, codec):
                return f"merged update bytes of {r} pieces"
        theta, momentum = {"w": _vector(g, n, 1.0)}, {"w": _vector(g, n, 1e-3)}
        dev_theta = {k: v.to(device) for k, v in theta.items()}
        dev_momentum = {k: v.to(device) for k, v in momentum.items()}
        apply_shard(theta, momentum, (0, n), on_cpu.merged, params)
        apply_shard(dev_theta, dev_momentum, (0, n), on_dev.merged, params)
        if not (torch.equal(theta["w"], dev_theta["w"].to(cpu)) and torch.equal(momentum["w"], dev_momentum["w"].to(cpu))):
            return f"outer step after a merge of {r} pieces"
    return ""


def pick_sync_device(device: str | torch.device) -> torch.device:
    """`device` if it is the CPU, or a GPU that passes `check_same_bits`; else the CPU."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    try:
        differs = check_same_bits(dev)
    except Exception as exc:  # noqa: BLE001 - any failure of the check means: do not trust the device
        differs = f"the check failed ({exc})"
    if differs:
        log.warning("the sharded sync on %s does not reproduce the CPU's bits (%s): merging on the CPU", dev, differs)
        return torch.device("cpu")
    log.info("the sharded sync runs on %s (it reproduces the CPU's bits)", dev)
    return dev
