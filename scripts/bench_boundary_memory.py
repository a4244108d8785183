"""Bytes autograd keeps for the backward of one middle pipeline stage, per boundary variant.

    python scripts/bench_boundary_memory.py                 # standard config (d 1024, 8 layers, 4 stages)
    python scripts/bench_boundary_memory.py --batch 2 --seq-len 512

Counts every tensor storage saved for the backward during one forward of stage 1 (decoder, its
blocks, encoder), each storage once, in fp32 and under bf16 autocast (CPU autocast: the same
casts as CUDA's for these ops). Device-independent: it is the activation memory a GPU step holds
at its peak, not the allocator's peak (no workspace or fragmentation).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from resbm.config import ModelConfig
from resbm.stages import build_stages

__all__ = ["saved_bytes", "main"]

SETTINGS = (("none", None, False), ("resbm", "postnorm", True), ("resbm", "postnorm-fused", True))


def saved_bytes(cfg: ModelConfig, batch: int, autocast: bool) -> int:
    """Bytes of the distinct storages saved for the backward by one forward of stage 1."""
    torch.manual_seed(0)
    stage = build_stages(cfg, seed=0, stages=[1])[0]
    x = torch.randn(batch, cfg.seq_len, cfg.code_dim, requires_grad=True)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len))
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = stage(x, tokens=tokens)
    del out
    return sum(seen.values())


def main(argv=None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args(argv)
    print(f"{'setting':<34} {'fp32 MiB':>9} {'vs none':>8} {'bf16 MiB':>9} {'vs none':>8}")
    base = {}
    for kind, variant, reinject in SETTINGS:
        cfg = ModelConfig.preset("bench", boundary=kind, boundary_variant=variant, token_reinject=reinject,
                                 seq_len=args.seq_len)
        row = [saved_bytes(cfg, args.batch, ac) for ac in (False, True)]
        base = base or dict(enumerate(row))
        name = f"{kind}/{variant or '-'}{' +tok' if reinject else ''}"
        print(f"{name:<34} " + " ".join(f"{b / 2**20:>9.1f} {100 * (b / base[i] - 1):>+7.1f}%" for i, b in enumerate(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
