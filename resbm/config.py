"""Model configuration: one dataclass holding every size, with validation and cost estimates."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from . import codec
from .data import VOCAB_SIZE

__all__ = ["BOUNDARY_KINDS", "BOUNDARY_VARIANTS", "DEFAULT_BOTTLENECK_RATIO", "DEFAULT_RESBM_VARIANT", "PRESETS",
           "ModelConfig"]

BOUNDARY_KINDS: tuple[str, ...] = ("none", "naive", "resbm", "resbm-iota")
DEFAULT_RESBM_VARIANT = "postnorm"
"""The default boundary's variant: `postnorm`, or `postnorm-fused`, the same formula and parameters
computed by two autograd functions that keep less for the backward (resbm/boundary_fused.py).
Switching between the two is this one line (then re-run the audit calibration: rounding differs)."""
# kind -> variants; the first one is the default. boundary.py documents what each variant computes.
BOUNDARY_VARIANTS: dict[str, tuple[str, ...]] = {
    "none": ("identity",),
    "naive": ("normed",),
    "resbm": (DEFAULT_RESBM_VARIANT,
              *(v for v in ("postnorm", "normed", "literal", "postnorm-fused") if v != DEFAULT_RESBM_VARIANT)),
    "resbm-iota": ("fused-mlp",),
}
DEFAULT_BOTTLENECK_RATIO = 128


def _swiglu_hidden(d_model: int) -> int:
    """SwiGLU width with ~ the parameters of a 4d GELU MLP: 8/3 d rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d_model / 3 / 64)


@dataclass
class ModelConfig:
    """Every size of a ResBM transformer. Invalid combinations raise ValueError naming the field."""

    vocab_size: int = VOCAB_SIZE
    """Token vocabulary size (>= 2); the default is the data pipeline's `data.VOCAB_SIZE`."""
    d_model: int = 64
    """Residual width d (>= 1); divisible by n_heads with an even head dim (rotary pairs)."""
    n_layers: int = 4
    """Transformer blocks in total; divisible by n_stages unless stage_layers says otherwise."""
    n_heads: int = 4
    """Attention heads; must divide d_model."""
    seq_len: int = 64
    """Tokens per sequence (>= 1); rotary tables are built for this length."""
    n_stages: int = 2
    """Pipeline stages S (1 <= S <= n_layers); there are S - 1 boundaries."""
    mlp_hidden: int | None = None
    """SwiGLU hidden width; None means 8/3 * d_model rounded up to a multiple of 64."""
    bottleneck_ratio: int | None = None
    """Compression r: the code width is k = d_model / r (must be an integer >= 1). None together with
    bottleneck_dim None means r = 128. Set this or bottleneck_dim; both only if d_model == r * k."""
    bottleneck_dim: int | None = None
    """Code width k directly (1 <= k <= d_model); alternative to bottleneck_ratio."""
    boundary: str = "resbm"
    """Boundary kind, one of BOUNDARY_KINDS: none | naive | resbm | resbm-iota (see boundary.py)."""
    boundary_variant: str | None = None
    """Variant of the boundary kind (BOUNDARY_VARIANTS[kind]); None picks the kind's default."""
    wire_codec: str = "bf16"
    """Codec of the code and its gradient on the wire: fp32 | bf16 | fp8 | int8 (resbm/codec.py)."""
    token_reinject: bool = True
    """Every stage after the first adds its own learned embedding of the input tokens (zero init) to
    the decoded residual, for every boundary kind (boundary.py). The tokens are public: no bytes on the wire."""
    token_reinject_rank: int | None = None
    """Re-injection table shape: 0 = a full vocab x d table, r >= 1 = vocab x r then r x d (factored),
    None = `reinject_rank`'s rule (factored at rank 256 above vocab 8192, measured in docs/BENCHMARKS.md)."""
    stage_layers: tuple[int, ...] | None = None
    """Blocks per stage (n_stages entries, each >= 1, summing to n_layers); None = even split."""
    rope_base: float = 10000.0
    """Rotary embedding base (> 0)."""
    init_std: float = 0.02
    """Std of the normal init of embeddings and hidden matrices (> 0); see model.init_weights."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon (> 0)."""

    def __post_init__(self) -> None:
        if self.stage_layers is not None:
            self.stage_layers = tuple(int(n) for n in self.stage_layers)
        if self.mlp_hidden is None:
            self.mlp_hidden = _swiglu_hidden(self.d_model)
        if self.boundary_variant is None and self.boundary in BOUNDARY_VARIANTS:
            self.boundary_variant = BOUNDARY_VARIANTS[self.boundary][0]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range or inconsistent."""
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len", "n_stages", "mlp_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}); "
                             "change n_heads or d_model")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads = {self.d_model // self.n_heads} must be even "
                             "for rotary embeddings; change n_heads")
        if self.n_stages > self.n_layers:
            raise ValueError(f"n_stages ({self.n_stages}) must be <= n_layers ({self.n_layers})")
        if self.stage_layers is None:
            if self.n_layers % self.n_stages:
                raise ValueError(f"n_layers ({self.n_layers}) must be divisible by n_stages "
                                 f"({self.n_stages}), or set stage_layers to an explicit split")
        else:
            sl = self.stage_layers
            if len(sl) != self.n_stages or any(n < 1 for n in sl) or sum(sl) != self.n_layers:
                raise ValueError(f"stage_layers {sl} must have n_stages ({self.n_stages}) entries, "
                                 f"each >= 1, summing to n_layers ({self.n_layers})")
        if self.boundary not in BOUNDARY_KINDS:
            raise ValueError(f"boundary must be one of {list(BOUNDARY_KINDS)}, got {self.boundary!r}")
        variants = BOUNDARY_VARIANTS[self.boundary]
        if self.boundary_variant not in variants:
            raise ValueError(f"boundary_variant {self.boundary_variant!r} is not a variant of boundary "
                             f"{self.boundary!r}; expected one of {list(variants)}")
        if not isinstance(self.token_reinject, bool):
            raise ValueError(f"token_reinject must be a bool, got {self.token_reinject!r}")
        r = self.token_reinject_rank
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 0 <= r <= self.d_model):
            raise ValueError(f"token_reinject_rank must be None (auto), 0 (full table) or 1..d_model "
                             f"({self.d_model}), got {r!r}")
        if self.wire_codec not in codec.CODECS:
            raise ValueError(f"wire_codec must be one of {list(codec.CODECS)}, got {self.wire_codec!r}")
        self._check_bottleneck()
        for name in ("rope_base", "init_std", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")

    def _check_bottleneck(self) -> None:
        r, k, d = self.bottleneck_ratio, self.bottleneck_dim, self.d_model
        for name, value in (("bottleneck_ratio", r), ("bottleneck_dim", k)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if r is not None and k is not None and r * k != d:
            raise ValueError(f"bottleneck_ratio ({r}) and bottleneck_dim ({k}) disagree: d_model ({d}) "
                             "!= r * k; set only one of them")
        if k is None:
            r = DEFAULT_BOTTLENECK_RATIO if r is None else r
            if d % r:
                raise ValueError(f"bottleneck_ratio ({r}) must divide d_model ({d}) so that k = d/r is an "
                                 "integer; pick another ratio or set bottleneck_dim")
        elif k > d:
            raise ValueError(f"bottleneck_dim ({k}) must be <= d_model ({d})")

    # ----- derived sizes -----
    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def bottleneck_width(self) -> int:
        """k = d_model / r for the compressing kinds (defined for every kind)."""
        if self.bottleneck_dim is not None:
            return self.bottleneck_dim
        return self.d_model // (self.bottleneck_ratio or DEFAULT_BOTTLENECK_RATIO)

    @property
    def code_dim(self) -> int:
        """Width of the tensor that crosses a boundary: k, or d_model for boundary 'none'."""
        return self.d_model if self.boundary == "none" else self.bottleneck_width

    def code_shape(self, batch_size: int) -> tuple[int, int, int]:
        """Shape (B, T, code_dim) of one micro-batch's code (and of its gradient)."""
        return (batch_size, self.seq_len, self.code_dim)

    def layers_per_stage(self) -> tuple[int, ...]:
        """Number of blocks in each stage."""
        if self.stage_layers is not None:
            return tuple(self.stage_layers)
        return (self.n_layers // self.n_stages,) * self.n_stages

    def stage_layer_range(self, stage: int) -> range:
        """Global indices of the blocks in `stage`."""
        if not 0 <= stage < self.n_stages:
            raise ValueError(f"stage must be in 0..{self.n_stages - 1}, got {stage}")
        counts = self.layers_per_stage()
        start = sum(counts[:stage])
        return range(start, start + counts[stage])

    # ----- costs -----
    def wire_bytes_per_token(self, batch_size: int = 1, direction: str = "both") -> float:
        """Bytes on the wire per token per boundary (fwd code + bwd gradient by default), header amortised
        over one micro-batch of `batch_size` sequences; direction 'fwd' or 'bwd' gives one way."""
        if direction not in ("both", "fwd", "bwd"):
            raise ValueError(f"direction must be 'both', 'fwd' or 'bwd', got {direction!r}")
        one_way = codec.wire_size(self.code_shape(batch_size), self.wire_codec) / (batch_size * self.seq_len)
        return 2 * one_way if direction == "both" else one_way

    @property
    def reinject_rank(self) -> int:
        """Rank of each token re-injection table: 0 = full vocab x d. Auto (None): factored at 256 when
        vocab > 8192 and d > 256 (the measurements behind the rule: docs/BENCHMARKS.md, "Token
        re-injection at a real vocabulary")."""
        if self.token_reinject_rank is not None:
            return self.token_reinject_rank
        return 256 if self.vocab_size > 8192 and self.d_model > 256 else 0

    def matmul_params(self) -> int:
        """Weights used in matmuls per token (blocks, boundaries, head); embedding lookups, the token
        re-injection tables among them, are not counted."""
        d, h, k = self.d_model, self.mlp_hidden, self.bottleneck_width
        per_block = 4 * d * d + 3 * d * h
        total = self.n_layers * per_block + self.vocab_size * d
        nb = self.n_stages - 1
        if self.boundary in ("naive", "resbm"):
            total += nb * 2 * d * k
        elif self.boundary == "resbm-iota":
            total += nb * (k * d - h * d + h * k)  # decoder k->d; the fused MLP's down-proj goes to k
        if self.token_reinject and self.reinject_rank:
            total += nb * self.reinject_rank * d  # the factored table's r -> d projection
        return total

    def flops_per_token(self) -> float:
        """Training FLOPs per token (fwd + bwd), nanoGPT style: 6 N + 12 L d T for attention."""
        return 6 * self.matmul_params() + 12 * self.n_layers * self.d_model * self.seq_len

    # ----- serialisation -----
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        out = dataclasses.asdict(self)
        if out["stage_layers"] is not None:
            out["stage_layers"] = list(out["stage_layers"])
        return out

    def config_hash(self) -> str:
        """16 hex digits identifying every field (defaults filled in): what audit tolerances were
        calibrated on (protocol.audit_tolerances); two configs building the same model agree."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict; unknown keys are rejected by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named config ('tiny', 'small', 'bench'), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls.from_dict(fields)


PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: runs a few hundred steps in seconds.
    "tiny": dict(d_model=64, n_layers=4, n_heads=4, seq_len=64, n_stages=2, bottleneck_ratio=16),
    # A few-minute CPU quick start (localnet default).
    "small": dict(d_model=256, n_layers=4, n_heads=4, seq_len=128, n_stages=2, bottleneck_ratio=32),
    # The GPU benchmark standard (8 layers, d 1024, 16 heads, seq 512, 4 stages, r 128 -> k 8).
    "bench": dict(d_model=1024, n_layers=8, n_heads=16, seq_len=512, n_stages=4, bottleneck_ratio=128),
    # The GPU subnet benchmark: ~1.0B matmul parameters (20 blocks at d 2048), 5 blocks per stage.
    "1b": dict(d_model=2048, n_layers=20, n_heads=16, seq_len=1024, n_stages=4, bottleneck_ratio=128),
}
