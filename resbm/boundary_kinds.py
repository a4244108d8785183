"""Which boundary module a model config builds (`build_boundary`): the one place that knows every
kind and variant, the fused ones (resbm.boundary_fused subclasses resbm.boundary) included."""
from __future__ import annotations

from .boundary import Boundary, Decoder, IdentityEncoder, IotaEncoder, NaiveEncoder, ResBMEncoder
from .boundary_fused import FusedPostnormDecoder, FusedResBMEncoder
from .config import ModelConfig

__all__ = ["build_boundary"]


def build_boundary(cfg: ModelConfig, encoder: bool = True, decoder: bool = True) -> Boundary:
    """The boundary module of cfg's kind and variant, with only the requested sides built."""
    kind, variant = cfg.boundary, cfg.boundary_variant
    if kind == "none":
        enc, dec = (lambda: IdentityEncoder(cfg)), (lambda: Decoder(cfg, False, False))
    elif kind == "naive":
        enc, dec = (lambda: NaiveEncoder(cfg)), (lambda: Decoder(cfg, True, False))
    elif kind == "resbm" and variant == "postnorm-fused":
        enc = lambda: FusedResBMEncoder(cfg, normed=True)  # noqa: E731
        dec = lambda: FusedPostnormDecoder(cfg, True, True, post_norm=True)  # noqa: E731
    elif kind == "resbm":
        enc = lambda: ResBMEncoder(cfg, normed=(variant != "literal"))  # noqa: E731
        dec = lambda: Decoder(cfg, True, True, post_norm=(variant == "postnorm"))  # noqa: E731
    elif kind == "resbm-iota":
        enc, dec = (lambda: IotaEncoder(cfg)), (lambda: Decoder(cfg, True, True))
    else:  # ModelConfig.validate rejects this earlier
        raise ValueError(f"unknown boundary kind {kind!r}")
    return Boundary(enc() if encoder else None, dec() if decoder else None)
