"""Stage boundaries: an encoder (end of stage s) emits the wire code, a decoder (start of s+1) reads it.

One small interface for every kind. `encoder(h) -> z` maps the d-wide residual h to the code z
(code_dim wide) and applies the wire codec's fake quantiser, so z is exactly what the next stage
decodes from the wire. `decoder(z) -> h'` maps it back to d wide; its first op is
`codec.fake_quantize_grad`, so the gradient it sends back is exactly what the wire carries too.
Names below: J = [I_k 0], `h[:k]` is J h, `pad(z)` is J^T z (z followed by d - k zeros),
`norm` is an RMSNorm with a learned gain (init 1), E is Linear(d, k), D is Linear(k, d), no biases.

Kinds and variants (ModelConfig.boundary / boundary_variant):

- `none` / `identity`: z = h (d wide), h' = z. The uncompressed baseline.
- `naive` / `normed`: z = E(norm h), h' = D(z). No identity path.
  Init: E ~ N(0, 1/sqrt(d)), D ~ N(0, 1/sqrt(k)), so z and h' start at about unit RMS.
- `resbm` / `postnorm` (default): hn = norm(h), z = E(hn) + hn[:k], then the decoder normalises
  its output: h' = norm_out(D(z) + pad(z)), norm_out an RMSNorm with a learned gain (init 1).
- `resbm` / `postnorm-fused`: `postnorm` computed by two fused autograd functions that keep less
  for the backward (boundary_fused.py); same parameters and formula, rounding aside.
- `resbm` / `normed`: as `postnorm` without norm_out: h' = D(z) + pad(z).
- `resbm` / `literal`: z = E(h) + h[:k], h' = D(z) + pad(z) (the paper read literally).
  Init for all three: E ~ N(0, init_std), D = 0, so at step 0 the boundary is the identity path
  (the next stage sees the first k channels) and E, D grow from there; D's gradient is
  nonzero at once (dL/dh' z^T) and E gets gradient through the identity path of the decoder.
- `resbm-iota` / `fused-mlp`: the encoder is fused into the last MLP of the stage. That block
  keeps its attention but has no MLP of its own; with x the residual after that attention,
  z = W_down(silu(W_gate n) * W_up n) + x[:k] with n = norm(x), W_down: hidden -> k.
  The decoder is h' = D(z) + pad(z), the residual the next stage's first attention reads.
  Init: W_gate, W_up ~ N(0, init_std), W_down ~ N(0, init_std / sqrt(2 n_layers)), D = 0.

Token re-injection (ModelConfig.token_reinject, default on, any kind): the decoder of boundary b
also owns `embed`, an nn.Embedding(vocab_size, d) initialised to zeros (or, at
ModelConfig.reinject_rank r > 0, a FactoredEmbedding: vocab x r ~ N(0, 1) then r x d zeros), and returns
h' + embed(tokens), added after everything above (after norm_out for `postnorm`). So every stage
after the first adds its own learned embedding of the input tokens. The tokens are public (each
stage derives them from the sample id, as the last stage does for its targets): no wire bytes.

The default is `resbm` / `postnorm` with token re-injection, the best form measured (docs/BENCHMARKS.md,
"Compression quality").

Add a variant by listing it in config.BOUNDARY_VARIANTS and handling it in `resbm.boundary_kinds.build_boundary`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import codec
from .config import ModelConfig

__all__ = ["Boundary", "FactoredEmbedding", "RMSNorm", "check_tokens", "init_rule"]


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain, no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class IdentityEncoder(nn.Module):
    """z = h, fake-quantised for the wire."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.codec = cfg.wire_codec

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return codec.fake_quantize(h, self.codec)


class NaiveEncoder(nn.Module):
    """z = E(norm h), fake-quantised."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.codec = cfg.wire_codec
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(cfg.d_model, cfg.code_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return codec.fake_quantize(self.proj(self.norm(h)), self.codec)


class ResBMEncoder(nn.Module):
    """z = E(hn) + hn[:k] with hn = norm(h) ('normed') or hn = h ('literal'), fake-quantised."""

    def __init__(self, cfg: ModelConfig, normed: bool) -> None:
        super().__init__()
        self.codec = cfg.wire_codec
        self.k = cfg.code_dim
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if normed else None
        self.proj = nn.Linear(cfg.d_model, cfg.code_dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        hn = self.norm(h) if self.norm is not None else h
        return codec.fake_quantize(self.proj(hn) + hn[..., : self.k], self.codec)


class IotaEncoder(nn.Module):
    """The stage's last MLP with a k-wide output plus the first k residual channels, fake-quantised."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.codec = cfg.wire_codec
        self.k = cfg.code_dim
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.gate = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.code_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        z = self.down(F.silu(self.gate(n)) * self.up(n)) + x[..., : self.k]
        return codec.fake_quantize(z, self.codec)


def check_tokens(tokens: torch.Tensor | None, batch_shape: tuple[int, ...], vocab_size: int, who: str) -> None:
    """Raise ValueError unless `tokens` are integer ids of shape batch_shape (B, T) in [0, vocab_size)."""
    if tokens is None:
        raise ValueError(f"{who} needs the sample's input tokens (token_reinject): pass tokens=, the "
                         "int64 (B, T) ids of data.batch(run_seed, sample_id, ...)[0]")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: tokens must be an int64 (or int32) tensor of token ids, got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
    if tuple(tokens.shape) != tuple(batch_shape):
        raise ValueError(f"{who}: tokens shape {tuple(tokens.shape)} must be (B, T) = {tuple(batch_shape)}")
    # The range check reads the ids back, a device sync per call on an accelerator; there the ids come
    # from the local data pipeline (resbm.data, bounded by the vocab), so only CPU tensors are checked.
    if tokens.numel() and tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{who}: token ids must be in [0, {vocab_size}), got min {lo} max {hi}")


class FactoredEmbedding(nn.Module):
    """A vocab x d token table as vocab x r (`table`) then r x d (`up`): r (V + d) parameters, not V d."""

    def __init__(self, vocab: int, rank: int, d: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, rank, _weight=torch.zeros(vocab, rank))
        self.up = nn.Parameter(torch.zeros(d, rank))  # (out, in), as nn.Linear's weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d)."""
        return F.linear(self.table(tokens), self.up)


class Decoder(nn.Module):
    """h' = z (identity), D(z) (no identity path) or D(z) + pad(z), optionally RMS-normed after, plus
    embed(tokens) under token re-injection; the gradient to z is wire-exact."""

    def __init__(self, cfg: ModelConfig, project: bool, identity_path: bool, post_norm: bool = False) -> None:
        super().__init__()
        self.codec = cfg.wire_codec
        self.vocab_size = cfg.vocab_size
        self.pad = cfg.d_model - cfg.code_dim
        self.proj = nn.Linear(cfg.code_dim, cfg.d_model, bias=False) if project else None
        self.identity_path = identity_path
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if post_norm else None
        # Built from zero tensors: no random init, so the global RNG is not drawn from either.
        rank = cfg.reinject_rank
        self.embed = (None if not cfg.token_reinject else FactoredEmbedding(cfg.vocab_size, rank, cfg.d_model)
                      if rank else nn.Embedding(cfg.vocab_size, cfg.d_model,
                                                _weight=torch.zeros(cfg.vocab_size, cfg.d_model)))

    def forward(self, z: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Decode z (B, T, code_dim) to the residual; `tokens` (B, T) are required under token re-injection."""
        if self.embed is not None:
            check_tokens(tokens, tuple(z.shape[:-1]), self.vocab_size, "the boundary decoder")
        z = codec.fake_quantize_grad(z, self.codec)
        if self.proj is None:
            out = z
        else:
            out = self.proj(z)
            if self.identity_path:
                out = out + F.pad(z, (0, self.pad))
            if self.norm is not None:
                out = self.norm(out)
        return out if self.embed is None else out + self.embed(tokens)


class Boundary(nn.Module):
    """Holds `encoder` and/or `decoder` of one boundary (a stage owns only one side)."""

    def __init__(self, encoder: nn.Module | None, decoder: nn.Module | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, h: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder then decoder inline, as the monolithic model runs it (tokens: see Decoder; None is
        not passed on, so a replacement decoder taking only z still fits)."""
        z = self.encoder(h)
        return self.decoder(z) if tokens is None else self.decoder(z, tokens)


def init_rule(local_name: str, cfg: ModelConfig) -> tuple[str, float]:
    """Init of a boundary parameter named relative to its boundary ('encoder.proj.weight'):
    ('ones', 0) | ('zeros', 0) | ('normal', std). See the module docstring for the reasons."""
    d, k = cfg.d_model, cfg.code_dim
    if local_name.endswith("norm.weight"):
        return ("ones", 0.0)
    if local_name in ("decoder.embed.weight", "decoder.embed.up"):
        return ("zeros", 0.0)  # token re-injection starts as a no-op
    if local_name == "decoder.embed.table.weight":
        return ("normal", 1.0)  # as an embedding; `up` = 0 keeps the product zero at init
    if local_name == "decoder.proj.weight":
        return ("normal", 1 / math.sqrt(k)) if cfg.boundary == "naive" else ("zeros", 0.0)
    if local_name == "encoder.proj.weight":
        return ("normal", 1 / math.sqrt(d)) if cfg.boundary == "naive" else ("normal", cfg.init_std)
    if local_name in ("encoder.gate.weight", "encoder.up.weight"):
        return ("normal", cfg.init_std)
    if local_name == "encoder.down.weight":
        return ("normal", cfg.init_std / math.sqrt(2 * cfg.n_layers))
    raise ValueError(f"no init rule for boundary parameter {local_name!r}")
