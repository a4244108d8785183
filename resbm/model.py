"""The ResBM transformer, top to bottom: rotary attention, SwiGLU MLP, block, model, init.

Pre-norm RMSNorm blocks with no biases. A boundary (boundary.py) sits after the last block of
every stage but the last; the monolithic model runs its encoder and decoder inline, wire
fake-quantiser included, so it computes exactly what the pipeline of stages computes.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .boundary import RMSNorm, build_boundary, init_rule
from .config import ModelConfig

__all__ = ["Attention", "Block", "KVCache", "MLP", "ResBM", "block_has_mlp", "build_model", "init_weights",
           "lm_loss", "rotary_tables"]


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (seq_len, head_dim / 2), float32."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + half) of x (B, H, T, hd) by position-dependent angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """Keys and values of the positions a model has already seen, per block, so that decoding one
    more token costs one position (ResBM.forward(tokens, cache=...) appends the new positions).
    Boundaries and MLPs are per-position maps: only attention needs the past."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0
        """Positions held (the position of the next token)."""

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add a block's new keys and values (B, H, T, hd); returns all of them so far."""
        if self.keys[layer] is not None:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.wo = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[KVCache, int] | None = None) -> torch.Tensor:
        B, T, d = x.shape
        shape = (B, T, self.n_heads, d // self.n_heads)
        q = self.wq(x).view(shape).transpose(1, 2)
        k = self.wk(x).view(shape).transpose(1, 2)
        v = self.wv(x).view(shape).transpose(1, 2)
        if kv is None:
            q, k = _apply_rotary(q, cos[:T], sin[:T]), _apply_rotary(k, cos[:T], sin[:T])
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = _cached_attention(q, k, v, cos, sin, *kv)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, cache: KVCache, layer: int) -> torch.Tensor:
    """Attention of T new positions (after cache.length earlier ones) over every position so far."""
    p, T = cache.length, q.shape[2]
    if p + T > cos.shape[0]:
        raise ValueError(f"positions {p}..{p + T - 1} exceed the model's seq_len ({cos.shape[0]}): "
                         "start a new cache over a shorter context")
    q, k = _apply_rotary(q, cos[p:p + T], sin[p:p + T]), _apply_rotary(k, cos[p:p + T], sin[p:p + T])
    k, v = cache.append(layer, k, v)
    if T == 1:  # the one new position sees everything before it
        return F.scaled_dot_product_attention(q, k, v)
    if p == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, p + T, dtype=torch.bool, device=q.device).tril(diagonal=p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """x + attn(norm x), then x + mlp(norm x); `has_mlp=False` when a resbm-iota encoder replaces the MLP."""

    def __init__(self, cfg: ModelConfig, has_mlp: bool = True) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if has_mlp else None
        self.mlp = MLP(cfg) if has_mlp else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[KVCache, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv)
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x


def block_has_mlp(cfg: ModelConfig, layer: int) -> bool:
    """False for the last block of a non-final stage under resbm-iota (its MLP is the encoder)."""
    if cfg.boundary != "resbm-iota":
        return True
    ends = {cfg.stage_layer_range(s)[-1] for s in range(cfg.n_stages - 1)}
    return layer not in ends


class ResBM(nn.Module):
    """embed -> blocks, with boundary b after the last block of stage b (its decoder re-injects the
    tokens when cfg.token_reinject) -> final norm -> head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, block_has_mlp(cfg, i)) for i in range(cfg.n_layers))
        self.boundaries = nn.ModuleDict({str(b): build_boundary(cfg) for b in range(cfg.n_stages - 1)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._boundary_after = {cfg.stage_layer_range(s)[-1]: str(s) for s in range(cfg.n_stages - 1)}

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the mean cross-entropy against `targets` when given. With `cache`,
        `tokens` are the positions after the cached ones (inference: see KVCache)."""
        x = self.embed(tokens)
        reinject = tokens if self.cfg.token_reinject else None
        for i, block in enumerate(self.blocks):
            x = block(x, self.rope_cos, self.rope_sin) if cache is None else \
                block(x, self.rope_cos, self.rope_sin, (cache, i))
            if i in self._boundary_after:
                x = self.boundaries[self._boundary_after[i]](x, reinject)
        if cache is not None:
            cache.length += tokens.shape[1]
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        return lm_loss(logits, targets)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _rule(name: str, cfg: ModelConfig) -> tuple[str, float]:
    if name.startswith("boundaries."):
        return init_rule(name.split(".", 2)[2], cfg)
    if name.endswith("norm.weight"):
        return ("ones", 0.0)
    if name.endswith(("attn.wo.weight", "mlp.down.weight")):
        return ("normal", cfg.init_std / math.sqrt(2 * cfg.n_layers))  # GPT-2 residual scaling
    return ("normal", cfg.init_std)  # embed, head, wq/wk/wv, gate/up


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter from (seed, its name) alone, so a stage built on its own gets
    exactly the weights the monolithic model has under the same seed."""
    for name, p in module.named_parameters():
        kind, std = _rule(name, cfg)
        if kind == "ones":
            p.fill_(1.0)
        elif kind == "zeros":
            p.zero_()
        else:
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def build_model(cfg: ModelConfig, seed: int = 0) -> ResBM:
    """The monolithic model, float32 on CPU, initialised from `seed`."""
    model = ResBM(cfg)
    init_weights(model, cfg, seed)
    return model
