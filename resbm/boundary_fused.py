"""The default boundary (`resbm` / `postnorm`) as two fused autograd functions that keep only what
the backward needs (variant `postnorm-fused`; same parameters, names and formula as `postnorm`).

Autograd of the plain modules keeps, per boundary, the encoder's normalised input hn (d wide, the
matmul's saved operand) and the decoder's pre-norm sum u = D z + pad(z) (d wide). These functions
keep the encoder's input h and the decoder's code z (k wide) with one rstd per token each, and
recompute hn and u in the backward (two thin matmuls, k = d / r). Under autocast the matmuls run
in the autocast dtype exactly as nn.Linear would, and the gradients are cast the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import codec
from .boundary import Decoder, ResBMEncoder, check_tokens

__all__ = ["FusedResBMEncoder", "FusedPostnormDecoder"]


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def _rms_norm_backward(g_out: torch.Tensor, xhat: torch.Tensor, rstd: torch.Tensor, gain: torch.Tensor):
    """(dL/dx, dL/dgain) of y = xhat * gain with xhat = x * rstd."""
    g_gain = (g_out * xhat).reshape(-1, xhat.shape[-1]).sum(0)
    gx = g_out * gain
    return rstd * (gx - xhat * (gx * xhat).mean(-1, keepdim=True)), g_gain


class _Encode(torch.autograd.Function):
    """z = E(hn) + hn[:k], hn = h * rstd(h) * gain."""

    @staticmethod
    def forward(ctx, h, gain, weight, k: int, eps: float):
        rstd = _rstd(h, eps)
        hn = (h * rstd).to(h.dtype) * gain
        zp = F.linear(hn, weight)  # autocast applies here as in nn.Linear
        ctx.save_for_backward(h, gain, weight, rstd)
        ctx.k, ctx.mm_dtype = k, zp.dtype
        return zp + hn[..., :k]

    @staticmethod
    def backward(ctx, gz):
        h, gain, weight, rstd = ctx.saved_tensors
        xhat = (h * rstd).to(h.dtype)
        hn = xhat * gain
        gzp = gz.to(ctx.mm_dtype)
        ghn = (gzp @ weight.to(ctx.mm_dtype)).to(hn.dtype)
        ghn[..., :ctx.k] += gz.to(hn.dtype)
        gw = gzp.reshape(-1, gzp.shape[-1]).t() @ hn.to(ctx.mm_dtype).reshape(-1, hn.shape[-1])
        gh, g_gain = _rms_norm_backward(ghn, xhat, rstd, gain)
        return gh.to(h.dtype), g_gain.to(gain.dtype), gw.to(weight.dtype), None, None


class _DecodePostnorm(torch.autograd.Function):
    """y = norm(D z + pad(z)) with a learned gain."""

    @staticmethod
    def forward(ctx, z, weight, gain, eps: float):
        up = F.linear(z, weight)
        pad = weight.shape[0] - z.shape[-1]
        u = up + F.pad(z, (0, pad))
        rstd = _rstd(u, eps)
        ctx.save_for_backward(z, weight, gain, rstd)
        ctx.mm_dtype, ctx.u_dtype = up.dtype, u.dtype
        return (u * rstd).to(u.dtype) * gain

    @staticmethod
    def backward(ctx, gy):
        z, weight, gain, rstd = ctx.saved_tensors
        mm, k = ctx.mm_dtype, z.shape[-1]
        u = F.linear(z.to(mm), weight.to(mm)).to(ctx.u_dtype) + F.pad(z, (0, weight.shape[0] - k)).to(ctx.u_dtype)
        xhat = (u * rstd).to(u.dtype)
        gu, g_gain = _rms_norm_backward(gy.to(u.dtype), xhat, rstd, gain)
        gup = gu.to(mm)
        gz = (gup @ weight.to(mm)).to(z.dtype) + gu[..., :k].to(z.dtype)
        gw = gup.reshape(-1, gup.shape[-1]).t() @ z.to(mm).reshape(-1, k)
        return gz, gw.to(weight.dtype), g_gain.to(gain.dtype), None


class FusedResBMEncoder(ResBMEncoder):
    """`postnorm`'s encoder through one autograd function, fake-quantised for the wire."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = _Encode.apply(h, self.norm.weight, self.proj.weight, self.k, self.norm.eps)
        return codec.fake_quantize(z, self.codec)


class FusedPostnormDecoder(Decoder):
    """`postnorm`'s decoder through one autograd function, plus token re-injection."""

    def forward(self, z: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Decode z (B, T, code_dim); `tokens` (B, T) are required under token re-injection."""
        if self.embed is not None:
            check_tokens(tokens, tuple(z.shape[:-1]), self.vocab_size, "the boundary decoder")
        z = codec.fake_quantize_grad(z, self.codec)
        out = _DecodePostnorm.apply(z, self.proj.weight, self.norm.weight, self.norm.eps)
        return out if self.embed is None else out + self.embed(tokens)
