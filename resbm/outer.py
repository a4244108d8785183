"""Outer (DiLoCo-style) step: pseudo-gradients, robust merge, Nesterov outer SGD, state I/O.

Every replica of a stage computes the merge itself and reports the hash of the result, so the
arithmetic here must be bit-identical on every machine. The rules that make it so:

* everything is fp32 on the CPU and walks parameter names in sorted order;
* only element-wise ops (each element rounded once, IEEE) touch the tensors, never a fused
  multiply-add and never a multi-threaded reduction whose grouping depends on the core count;
* the one reduction (a replica's global norm, for clipping) is done in float64 by numpy's
  fixed pairwise summation and rounded to float32 before use.

Serialised states and pseudo-gradients are safetensors (no pickle), with sorted names and no
metadata, so equal tensors give equal bytes and equal sha256.
"""
from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "OuterError",
    "MergeError",
    "StateError",
    "MERGE_METHODS",
    "DEFAULT_MAX_BYTES",
    "pseudo_gradient",
    "merge",
    "nesterov_step",
    "state_bytes",
    "state_from_bytes",
    "load_state",
    "OuterState",
    "state_hash",
    "tensors_bytes",
    "tensors_from_bytes",
    "tensors_hash",
]

log = logging.getLogger(__name__)

MERGE_METHODS = ("clipped-mean", "trimmed-mean", "mean")
DEFAULT_MAX_BYTES = 8 << 30  # 8 GiB; callers should pass the exact bound for their stage

Tensors = dict[str, torch.Tensor]


class OuterError(ValueError):
    """Base class of every error raised by the outer step."""


class MergeError(OuterError):
    """A replica's pseudo-gradient cannot be merged; `replica` is its index in the items."""

    def __init__(self, replica: int, message: str) -> None:
        super().__init__(f"replica {replica}: {message}")
        self.replica = replica


class StateError(OuterError):
    """Serialised tensors do not match what was expected (names, shapes, dtype, finiteness, size)."""


def _fp32_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _fp32_on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def pseudo_gradient(theta_start: Mapping[str, torch.Tensor], theta_local: Mapping[str, torch.Tensor]) -> Tensors:
    """Return theta_start - theta_local per name (fp32, CPU, sorted names)."""
    if set(theta_start) != set(theta_local):
        missing = sorted(set(theta_start) ^ set(theta_local))
        raise OuterError(f"theta_start and theta_local differ in names: {missing[:5]}")
    out: Tensors = {}
    for name in sorted(theta_start):
        a, b = theta_start[name], theta_local[name]
        if tuple(a.shape) != tuple(b.shape):
            raise OuterError(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
        out[name] = _fp32_cpu(a) - _fp32_cpu(b)
    return out


def _global_norm(d: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm, accumulated in float64 with numpy's fixed pairwise sum, rounded to fp32
    (on the CPU whatever device holds the tensors: the same sum everywhere)."""
    total = 0.0
    for name in sorted(d):
        x = _fp32_cpu(d[name]).numpy().astype(np.float64).ravel()  # a fresh float64 copy
        np.multiply(x, x, out=x)  # squared in place: the same values as x * x, one array fewer
        total += float(np.sum(x))
    return float(np.float32(math.sqrt(total)))


def _validate_items(items: Sequence[tuple[int, Mapping[str, torch.Tensor]]]) -> list[tuple[int, Tensors]]:
    if len(items) == 0:
        raise OuterError("merge needs at least one replica")
    ref_names: list[str] | None = None
    ref_shapes: dict[str, tuple[int, ...]] = {}
    clean: list[tuple[int, Tensors]] = []
    for i, item in enumerate(items):
        try:
            count, tensors = item
        except (TypeError, ValueError):
            raise MergeError(i, "item must be (sample_count, {name: tensor})") from None
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise MergeError(i, f"sample_count must be a positive int, got {count!r}")
        names = sorted(tensors)
        if ref_names is None:
            ref_names = names
            ref_shapes = {n: tuple(tensors[n].shape) for n in names}
        elif names != ref_names:
            diff = sorted(set(names) ^ set(ref_names))
            raise MergeError(i, f"names differ from replica 0: {diff[:5]}")
        d: Tensors = {}
        for n in names:
            t = tensors[n]
            if not isinstance(t, torch.Tensor):
                raise MergeError(i, f"{n}: not a tensor")
            if tuple(t.shape) != ref_shapes[n]:
                raise MergeError(i, f"{n}: shape {tuple(t.shape)} != {ref_shapes[n]}")
            if not t.is_floating_point():
                raise MergeError(i, f"{n}: dtype {t.dtype} is not floating point")
            t = _fp32_cpu(t)
            if not bool(torch.isfinite(t).all()):
                raise MergeError(i, f"{n}: contains NaN or Inf")
            d[n] = t
        clean.append((count, d))
    return clean


def _weighted_mean(clean: list[tuple[int, Tensors]], scales: list[float]) -> Tensors:
    total = sum(c for c, _ in clean)
    out: Tensors = {}
    for n in sorted(clean[0][1]):
        acc = torch.zeros_like(clean[0][1][n])
        for (count, d), s in zip(clean, scales):
            w = torch.tensor(count * s / total, dtype=torch.float32)
            acc = acc + d[n] * w
        out[n] = acc
    return out


def _trimmed_mean(clean: list[tuple[int, Tensors]], trim: int) -> Tensors:
    out: Tensors = {}
    keep = len(clean) - 2 * trim
    for n in sorted(clean[0][1]):
        stacked = torch.stack([d[n] for _, d in clean], dim=0)
        ordered = torch.sort(stacked, dim=0).values
        acc = ordered[trim].clone()
        for j in range(trim + 1, trim + keep):
            acc = acc + ordered[j]
        out[n] = acc / torch.tensor(float(keep), dtype=torch.float32, device=acc.device)
    return out


def merge(
    items: Sequence[tuple[int, Mapping[str, torch.Tensor]]],
    method: str = "clipped-mean",
    clip_factor: float = 2.0,
    trim: int = 1,
) -> Tensors:
    """Merge replicas' pseudo-gradients (in the given order) into one, robust to a bad replica.

    clipped-mean: scale each replica down to clip_factor x the median global norm, then take
    the sample-weighted mean. trimmed-mean (>= 3 replicas): per coordinate drop the `trim`
    largest and smallest values and average the rest. mean: plain sample-weighted mean.
    """
    if method not in MERGE_METHODS:
        raise OuterError(f"unknown merge method {method!r}; expected one of {MERGE_METHODS}")
    clean = _validate_items(items)
    if method == "mean":
        return _weighted_mean(clean, [1.0] * len(clean))
    if method == "clipped-mean":
        if not (clip_factor > 0 and math.isfinite(clip_factor)):
            raise OuterError(f"clip_factor must be a positive finite number, got {clip_factor!r}")
        norms = [_global_norm(d) for _, d in clean]
        bound = clip_factor * float(np.median(np.asarray(norms, dtype=np.float64)))
        scales = [1.0 if nrm <= bound or nrm == 0.0 else bound / nrm for nrm in norms]
        for i, s in enumerate(scales):
            if s < 1.0:
                log.info("merge: replica %d clipped (norm %.4g > bound %.4g)", i, norms[i], bound)
        return _weighted_mean(clean, scales)
    if isinstance(trim, bool) or not isinstance(trim, int) or trim < 1:
        raise OuterError(f"trim must be a positive int, got {trim!r}")
    if len(clean) < 2 * trim + 1:
        raise OuterError(f"trimmed-mean with trim={trim} needs >= {2 * trim + 1} replicas, got {len(clean)}")
    return _trimmed_mean(clean, trim)


def nesterov_step(
    theta: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    momentum: Mapping[str, torch.Tensor] | None,
    lr: float,
    momentum_coef: float,
) -> tuple[Tensors, Tensors]:
    """Outer Nesterov SGD: m' = mu*m + g; theta' = theta - lr*(g + mu*m'). momentum None at round 0.
    Computed on each theta tensor's device (element-wise IEEE operations, one per kernel: the same
    bits on a CPU and a GPU)."""
    if set(theta) != set(merged):
        raise OuterError(f"theta and merged differ in names: {sorted(set(theta) ^ set(merged))[:5]}")
    if momentum is not None and set(momentum) != set(theta):
        raise OuterError(f"momentum and theta differ in names: {sorted(set(theta) ^ set(momentum))[:5]}")
    if not (lr > 0 and math.isfinite(lr)) or not (0 <= momentum_coef < 1):
        raise OuterError(f"need lr > 0 and 0 <= momentum_coef < 1, got lr={lr!r} momentum_coef={momentum_coef!r}")
    lr_t = torch.tensor(lr, dtype=torch.float32)
    mu_t = torch.tensor(momentum_coef, dtype=torch.float32)
    theta_next: Tensors = {}
    mom_next: Tensors = {}
    for n in sorted(theta):
        dev = theta[n].device
        g = _fp32_on(merged[n], dev)
        if tuple(g.shape) != tuple(theta[n].shape):
            raise OuterError(f"{n}: merged shape {tuple(g.shape)} != theta shape {tuple(theta[n].shape)}")
        m = g.clone() if momentum is None else _fp32_on(momentum[n], dev) * mu_t + g
        update = g + m * mu_t
        theta_next[n] = _fp32_on(theta[n], dev) - update * lr_t
        mom_next[n] = m
    return theta_next, mom_next


def tensors_bytes(d: Mapping[str, torch.Tensor]) -> bytes:
    """Canonical safetensors bytes of {name: tensor} (fp32, CPU, sorted names, no metadata)."""
    return _st_save({n: _fp32_cpu(d[n]) for n in sorted(d)})


def tensors_hash(d: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of tensors_bytes(d)."""
    return hashlib.sha256(tensors_bytes(d)).hexdigest()


def _load_checked(data: bytes, max_bytes: int) -> Tensors:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise StateError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise StateError(f"object is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        loaded = _st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise StateError(f"not a valid safetensors object: {exc}") from None
    for n, t in loaded.items():
        if t.dtype != torch.float32:
            raise StateError(f"{n}: dtype {t.dtype}, expected torch.float32")
        if not bool(torch.isfinite(t).all()):
            raise StateError(f"{n}: contains NaN or Inf")
    return loaded


def _check_expected(got: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]], what: str) -> None:
    if set(got) != set(expected):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        raise StateError(f"{what}: missing names {missing[:5]}, unexpected names {extra[:5]}")
    for n, shape in expected.items():
        if tuple(got[n].shape) != tuple(shape):
            raise StateError(f"{what}: {n} has shape {tuple(got[n].shape)}, expected {tuple(shape)}")


def tensors_from_bytes(
    data: bytes, expected: Mapping[str, Sequence[int]], max_bytes: int = DEFAULT_MAX_BYTES
) -> Tensors:
    """Load a pseudo-gradient (or any tensor dict), checking names, shapes, fp32 and finiteness."""
    loaded = _load_checked(data, max_bytes)
    _check_expected(loaded, expected, "tensors")
    return {n: loaded[n] for n in sorted(loaded)}


def state_bytes(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor] | None,
                ref_norm: float | None = None) -> bytes:
    """Canonical bytes of an outer state: keys theta.<name>, (unless None) momentum.<name>, and
    (unless None) `outer.ref_norm`, the robust merge's reference norm for the next round."""
    if momentum is not None and set(momentum) != set(theta):
        raise OuterError(f"momentum and theta differ in names: {sorted(set(theta) ^ set(momentum))[:5]}")
    flat = {f"theta.{n}": t for n, t in theta.items()}
    if momentum is not None:
        flat.update({f"momentum.{n}": t for n, t in momentum.items()})
    if ref_norm is not None:
        flat["outer.ref_norm"] = torch.tensor([ref_norm], dtype=torch.float32)
    return tensors_bytes(flat)


def state_hash(theta: Mapping[str, torch.Tensor], momentum: Mapping[str, torch.Tensor] | None,
               ref_norm: float | None = None) -> str:
    """Hex sha256 of state_bytes(theta, momentum, ref_norm)."""
    return hashlib.sha256(state_bytes(theta, momentum, ref_norm)).hexdigest()


class OuterState(NamedTuple):
    """A loaded outer state: weights, momentum (None at round 0) and the merge's reference norm."""

    theta: Tensors
    momentum: Tensors | None
    ref_norm: float | None


def state_from_bytes(
    data: bytes,
    expected: Mapping[str, Sequence[int]] | Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[Tensors, Tensors | None]:
    """Load (theta, momentum or None) from state bytes, checking names, shapes, fp32, finiteness.

    `expected` is {name: shape} (full check), an iterable of names (names only), or None
    (only internal consistency: momentum, if present, matches theta name for name and shape).
    """
    st = load_state(data, expected, max_bytes)
    return st.theta, st.momentum


def load_state(
    data: bytes,
    expected: Mapping[str, Sequence[int]] | Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> OuterState:
    """Like state_from_bytes, and also the reference norm (`outer.ref_norm`, None if absent)."""
    loaded = _load_checked(data, max_bytes)
    theta: Tensors = {}
    momentum: Tensors = {}
    ref_norm: float | None = None
    for key, t in loaded.items():
        prefix, _, name = key.partition(".")
        if prefix == "theta" and name:
            theta[name] = t
        elif prefix == "momentum" and name:
            momentum[name] = t
        elif key == "outer.ref_norm" and tuple(t.shape) == (1,) and float(t[0]) >= 0:
            ref_norm = float(t[0])
        else:
            raise StateError(f"unexpected key {key!r}: keys must be theta.<name>, momentum.<name> "
                             "or outer.ref_norm (shape [1], >= 0)")
    if momentum:
        _check_expected(momentum, {n: tuple(t.shape) for n, t in theta.items()}, "momentum vs theta")
    if expected is not None:
        if isinstance(expected, Mapping):
            _check_expected(theta, expected, "theta")
        else:
            _check_expected(theta, {n: tuple(theta[n].shape) if n in theta else () for n in expected}, "theta")
    theta = {n: theta[n] for n in sorted(theta)}
    return OuterState(theta, {n: momentum[n] for n in sorted(momentum)} if momentum else None, ref_norm)
