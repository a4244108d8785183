"""Decoding speed with and without the KV cache (resbm.generate), measured in the same run.

    .venv/bin/python scripts/bench_generate.py --preset small --tokens 96            # CPU
    .venv/bin/python scripts/bench_generate.py --preset bench --device cuda --tokens 480

Greedy decoding of a random-weight model from a 16-token prompt: with the cache the prompt runs
once and each new token is one position; without it every token runs the whole context. Prints
tokens/s of both, their ratio, and whether they produced the same tokens (they must). Timings
on a shared machine are noisy: compare the two columns of one run, never across runs.
"""
from __future__ import annotations

import argparse
import time

import torch

from resbm.config import PRESETS, ModelConfig
from resbm.device import pick_device
from resbm.generate import SamplingConfig, generate
from resbm.model import build_model

__all__ = ["main"]


def _timed(model, prompt: list[int], tokens: int, use_cache: bool, device: torch.device) -> tuple[float, list[int]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = generate(model, prompt, tokens, SamplingConfig(temperature=0), use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(out) / (time.perf_counter() - t0), out


def main(argv: list[str] | None = None) -> int:
    """Print one table row per repeat: cached and uncached tokens/s."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=48, help="new tokens (at most the context minus the prompt)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (the box is shared)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = ModelConfig.preset(a.preset)
    dev = pick_device(a.device)
    model = build_model(cfg, seed=0).to(dev).eval()
    tokens = min(a.tokens, cfg.seq_len - 16)
    prompt = list(range(1, 17))
    _timed(model, prompt, 4, True, dev)  # warm-up
    print(f"preset {a.preset} (d {cfg.d_model}, {cfg.n_layers} layers, context {cfg.seq_len}) on {dev}, "
          f"{tokens} new tokens after a 16-token prompt")
    print(f"{'repeat':>6} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9} {'same tokens':>12}")
    for r in range(a.repeats):
        fast, x = _timed(model, prompt, tokens, True, dev)
        slow, y = _timed(model, prompt, tokens, False, dev)
        print(f"{r:>6} {fast:>13.1f} {slow:>15.1f} {fast / slow:>8.2f}x {str(x == y):>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
