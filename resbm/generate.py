"""Text continuation from a ResBM model: greedy or sampled (temperature, top-k, top-p), seeded.

With the KV cache (the default) the prompt is run once and every new token costs one position;
without it every step runs the whole context again (the reference the cache is tested against).
The context is at most the model's `seq_len` tokens: when it is full, the oldest tokens are
dropped so that half a window remains, and (with the cache) the cache is rebuilt from those.
Both modes see the same context at every step, so they pick the same tokens.

Sampling draws on the CPU from a seeded generator, so a seed gives the same text on any device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .model import KVCache, ResBM

__all__ = ["SamplingConfig", "pick_token", "generate", "stream"]


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: off), got {self.top_p}")


def pick_token(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator) -> int:
    """The next token from one position's logits (V,): argmax at temperature 0, else a draw from
    the temperature-scaled distribution cut to the top_k tokens and the top_p probability mass."""
    logits = logits.detach().float().cpu()
    if cfg.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.numel():
        kth = torch.topk(logits, cfg.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_p, dim=0) - sorted_p  # mass of the tokens ranked above each
        sorted_p[before >= cfg.top_p] = 0.0  # the first token is always kept (before = 0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=gen))


def _window(ctx: list[int], seq_len: int) -> list[int]:
    """The context to keep once it holds seq_len tokens: the newest half window."""
    return ctx[-max(1, seq_len // 2):]


@torch.no_grad()
def stream(model: ResBM, prompt: Sequence[int], max_new_tokens: int, cfg: SamplingConfig,
           stop_id: int | None = None, use_cache: bool = True,
           on_forward: Callable[[int], None] | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids after `prompt` (stopping after `stop_id`, which is
    not yielded). `on_forward(n)` is told the positions each forward pass computes."""
    if not prompt:
        raise ValueError("the prompt has no tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    model.eval()
    seq_len = model.cfg.seq_len
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    ctx = list(prompt)[-seq_len:]
    cache: KVCache | None = None

    def forward(ids: list[int]) -> torch.Tensor:
        if on_forward is not None:
            on_forward(len(ids))
        x = torch.tensor([ids], dtype=torch.int64, device=device)
        return model(x, cache=cache)[0, -1]

    pending: list[int] = []  # positions not in the cache yet
    for _ in range(max_new_tokens):
        if use_cache and cache is None:
            cache, pending = KVCache(len(model.blocks)), ctx
        logits = forward(pending if use_cache else ctx)
        token = pick_token(logits, cfg, gen)
        if token == stop_id:
            return
        yield token
        ctx.append(token)
        pending = [token]
        if len(ctx) > seq_len:  # the next step would pass the rotary table: keep the newest half
            ctx, cache = _window(ctx, seq_len), None  # (the cache is rebuilt from the kept window)


def generate(model: ResBM, prompt: Sequence[int], max_new_tokens: int, cfg: SamplingConfig,
             stop_id: int | None = None, use_cache: bool = True,
             on_forward: Callable[[int], None] | None = None) -> list[int]:
    """The new token ids `stream` yields, as a list."""
    return list(stream(model, prompt, max_new_tokens, cfg, stop_id, use_cache, on_forward))
