"""Model-side variants of the compression benchmark: low-rank token re-injection and the round-2
decoder/init/lr changes, applied around the library model (scripts/bench_compression.py)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from resbm import codec
from resbm.config import ModelConfig

__all__ = ["DEC_MODS", "LowRankEmbedding", "ModDecoder", "TokenReinjection", "apply_round2", "split_boundary_lr"]

DEC_MODS = ("", "idgain", "dgain", "outgain", "postnorm")
"""Decoder variants (round 2): 'idgain' h' = D(z) + pad(g*z), g learned k-wide (init 1);
'dgain' h' = g*D(z) + pad(z), g learned d-wide (init 1); 'outgain' h' = g*(D(z) + pad(z));
'postnorm' h' = norm(D(z) + pad(z)) with a learned gain. Gains go to AdamW, as norm gains do."""

class LowRankEmbedding(nn.Module):
    """vocab x r table (N(0, 1)) then r x d projection (zero init), so it starts at zero."""

    def __init__(self, vocab: int, rank: int, d: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab, rank)
        self.up = nn.Linear(rank, d, bias=False)
        nn.init.normal_(self.table.weight)
        nn.init.zeros_(self.up.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(tokens))


class TokenReinjection(nn.Module):
    """Experimental: each stage after the first adds its own embedding of the tokens to the decoded
    residual (the tokens are public: any stage can recompute them from the sample id)."""

    def __init__(self, cfg: ModelConfig, rank: int = 0) -> None:
        super().__init__()
        if rank:
            self.embed = nn.ModuleList(LowRankEmbedding(cfg.vocab_size, rank, cfg.d_model)
                                       for _ in range(cfg.n_stages - 1))
        else:
            self.embed = nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.d_model) for _ in range(cfg.n_stages - 1))
            for e in self.embed:
                nn.init.zeros_(e.weight)


class ModDecoder(nn.Module):
    """Round-2 decoder variants around the library's ResBM decoder (see DEC_MODS)."""

    def __init__(self, inner: nn.Module, mode: str, cfg: ModelConfig) -> None:
        super().__init__()
        self.inner, self.mode = inner, mode
        width = cfg.code_dim if mode == "idgain" else cfg.d_model
        self.gain = nn.Parameter(torch.ones(width))
        self.eps = cfg.norm_eps

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = codec.fake_quantize_grad(z, self.inner.codec)
        dz = self.inner.proj(z)
        if self.mode == "idgain":
            return dz + F.pad(z * self.gain, (0, self.inner.pad))
        if self.mode == "dgain":
            return dz * self.gain + F.pad(z, (0, self.inner.pad))
        out = dz + F.pad(z, (0, self.inner.pad))
        if self.mode == "outgain":
            return out * self.gain
        return F.rms_norm(out, (out.shape[-1],), self.gain, self.eps)  # postnorm


def apply_round2(model: nn.Module, s: Any) -> None:
    """Apply `s`'s init changes and decoder variant to every boundary of `model` (in place)."""
    if s.dec_mod not in DEC_MODS:
        raise ValueError(f"dec_mod must be one of {list(DEC_MODS)}, got {s.dec_mod!r}")
    changed = s.e_init != 1.0 or s.d_init != 0.0 or s.dec_mod or s.enc_lr != 1.0 or s.dec_lr != 1.0
    if changed and (s.boundary != "resbm" or s.variant not in (None, "normed")):
        raise ValueError(f"round-2 options (e_init, d_init, dec_mod, enc_lr, dec_lr) need boundary "
                         f"'resbm' variant 'normed', got {s.boundary!r} / {s.variant!r}")
    if (s.enc_lr != 1.0 or s.dec_lr != 1.0) and s.opt != "muon":
        raise ValueError(f"enc_lr/dec_lr are Muon lr multipliers: need opt 'muon', got {s.opt!r}")
    if not changed:
        return
    gen = torch.Generator().manual_seed(1000 + s.seed)
    with torch.no_grad():
        for b in model.boundaries.values():
            b.encoder.proj.weight.mul_(s.e_init)
            if s.d_init:
                w = b.decoder.proj.weight
                w.copy_(torch.randn(w.shape, generator=gen) * s.d_init)
            if s.dec_mod:
                b.decoder = ModDecoder(b.decoder, s.dec_mod, model.cfg).to(b.encoder.proj.weight.device)


def split_boundary_lr(opt: Any, model: nn.Module, s: Any) -> None:
    """Move E (and D) into their own Muon param groups at enc_lr (dec_lr) times the Muon lr."""
    if s.enc_lr == 1.0 and s.dec_lr == 1.0:
        return
    muon = opt.optimizers["muon"]
    base = opt._base_lr["muon"][0]
    for mult, side in ((s.enc_lr, "encoder"), (s.dec_lr, "decoder")):
        if mult == 1.0:
            continue
        params = [p for n, p in model.named_parameters() if n.startswith("boundaries.") and
                  f".{side}." in n and n.endswith("proj.weight")]
        ids = {id(p) for p in params}
        muon.param_groups[0]["params"] = [p for p in muon.param_groups[0]["params"] if id(p) not in ids]
        muon.add_param_group({"params": params, "lr": base * mult})
        opt._base_lr["muon"].append(base * mult)
