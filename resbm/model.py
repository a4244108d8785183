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

from spec.stage_shapes import block_has_mlp

from .boundary import RMSNorm, init_rule
from .boundary_kinds import build_boundary
from .config import ModelConfig

__all__ = ["Attention", "Block", "KVCache", "MLP", "ResBM", "block_has_mlp", "build_model", "init_weights", "initial_value",
           "lm_loss", "rotary_tables"]


def rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables, each (seq_len, head_dim), float32: cos of the angles twice, and (-sin, sin) of
    them, so that rotating channel pairs (i, i + head_dim/2) is x * cos + roll(x) * sin."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + half) of x (B, T, ..., hd) by position-dependent angles: first half
    x1 cos - x2 sin, second half x2 cos + x1 sin, each product rounded in x's dtype (4 kernels)."""
    shape = (x.shape[1],) + (1,) * (x.ndim - 3) + (x.shape[-1],)
    cos, sin = cos[: x.shape[1]].to(x.dtype).view(shape), sin[: x.shape[1]].to(x.dtype).view(shape)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def _joint_linear(x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
    """x through several bias-free linears at once (their weights stacked on the output dim): one matrix
    product, one autocast cast of x, and one input gradient instead of several summed."""
    return F.linear(x, torch.cat([layer.weight for layer in layers]))


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
    """Causal multi-head self-attention with rotary position embeddings.

    `fused_projections` (class-wide, default on) computes q, k, v with one matrix product of the
    stacked weights; off, three products (the bench's baseline). Parameters and their names are the
    same either way (wq, wk, wv, wo: Muon orthogonalises each on its own)."""

    fused_projections = True

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
        H = self.n_heads
        p = 0 if kv is None else kv[0].length
        if p + T > cos.shape[0]:
            raise ValueError(f"positions {p}..{p + T - 1} exceed the model's seq_len ({cos.shape[0]}): "
                             "start a new cache over a shorter context")
        cos, sin = cos[p:p + T], sin[p:p + T]
        if self.fused_projections:
            qkv = _joint_linear(x, self.wq, self.wk, self.wv).view(B, T, 3, H, d // H)
            q, k = _apply_rotary(qkv[:, :, :2], cos, sin).unbind(2)
            v = qkv[:, :, 2]
        else:
            shape = (B, T, H, d // H)
            q = _apply_rotary(self.wq(x).view(shape), cos, sin)
            k = _apply_rotary(self.wk(x).view(shape), cos, sin)
            v = self.wv(x).view(shape)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = _cached_attention(q, k, v, *kv)
        return self.wo(y.transpose(1, 2).reshape(B, T, d))


def _cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                      layer: int) -> torch.Tensor:
    """Attention of T new positions (rotated; after cache.length earlier ones) over every position so far."""
    p, T = cache.length, q.shape[2]
    k, v = cache.append(layer, k, v)
    if T == 1:  # the one new position sees everything before it
        return F.scaled_dot_product_attention(q, k, v)
    if p == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    mask = torch.ones(T, p + T, dtype=torch.bool, device=q.device).tril(diagonal=p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x); `fused_projections` as in Attention (gate and up in one product)."""

    fused_projections = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_projections:
            g, u = _joint_linear(x, self.gate, self.up).chunk(2, dim=-1)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(F.silu(g) * u)


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


def initial_value(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int) -> torch.Tensor:
    """The float32 CPU value parameter `name` starts at under `seed`: a function of (seed, name) alone."""
    kind, std = _rule(name, cfg)
    if kind == "ones":
        return torch.ones(shape)
    if kind == "zeros":
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise every parameter from (seed, its name) alone, so a stage built on its own gets
    exactly the weights the monolithic model has under the same seed."""
    for name, p in module.named_parameters():
        p.copy_(initial_value(name, tuple(p.shape), cfg, seed))


def build_model(cfg: ModelConfig, seed: int = 0) -> ResBM:
    """The monolithic model, float32 on CPU, initialised from `seed`."""
    model = ResBM(cfg)
    init_weights(model, cfg, seed)
    return model
