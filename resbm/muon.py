"""Muon with the Newton-Schulz iteration batched over same-shaped matrices.

`BatchedMuon` computes torch.optim.Muon's update (same hyperparameters, same per-parameter state
`momentum_buffer`, same param-group keys, so optimizer state dicts and checkpoints move between the
two), but instead of ~30 kernels and a Python loop per matrix it:

* updates every momentum buffer and the Nesterov blend with foreach ops (one launch group);
* stacks the updates of all matrices of one (oriented) shape into a bf16 batch and runs the quintic
  Newton-Schulz iteration on the whole batch with torch.bmm / torch.baddbmm;
* never reads a value back to the host, so the step is queued without a device sync.

Per matrix the arithmetic is torch's: the update is computed in the parameter's dtype, rounded to
bf16, transposed when it has more rows than columns, divided by its Frobenius norm (clamped at eps)
and iterated `ns_steps` times; the weight is decayed by (1 - lr * weight_decay) and moved by
-lr * sqrt(max(1, rows / cols)) * update ("original" lr adjustment). Batched matrix products may
round differently from single ones on some backends (different kernels); the result is the same
function to bf16 precision.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

__all__ = ["BatchedMuon", "newton_schulz"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
EPS = 1e-7
DEFAULT_MAX_BATCH_ELEMENTS = 1 << 28
"""Largest bf16 batch (elements) one Newton-Schulz call stacks: 512 MiB, bounding the temporaries."""


def newton_schulz(x: Tensor, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  steps: int = NS_STEPS, eps: float = EPS) -> Tensor:
    """Quintic Newton-Schulz orthogonalisation of a batch (n, m, k) with m <= k, in x's dtype, in place."""
    if x.ndim != 3 or x.shape[1] > x.shape[2]:
        raise ValueError(f"newton_schulz needs a batch (n, m, k) with m <= k, got {tuple(x.shape)}")
    a, b, c = coefficients
    x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x


def _adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon's update for 2-D parameters, Newton-Schulz batched per shape (see module doc)."""

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = EPS, ns_steps: int = NS_STEPS, adjust_lr_fn: str | None = None,
                 max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS) -> None:
        if not lr >= 0 or not momentum >= 0 or not weight_decay >= 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}")
        if len(ns_coefficients) != 3 or not 0 < ns_steps < 100:
            raise ValueError(f"need 3 Newton-Schulz coefficients and 0 < ns_steps < 100, got "
                             f"{ns_coefficients}, {ns_steps}")
        # The same group keys as torch.optim.Muon, so state dicts load into either.
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=tuple(ns_coefficients), eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        self.max_batch_elements = max(1, int(max_batch_elements))
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only supports 2-D parameters, got one of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One Muon step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse or torch.is_complex(p) for p in params):
                raise RuntimeError("Muon supports dense real gradients only")
            bufs = [self._buffer(p) for p in params]
            grads = [p.grad for p in params]
            mu = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            lr, wd = group["lr"], group["weight_decay"]
            lr = float(lr) if isinstance(lr, Tensor) else lr  # as torch's Muon (a tensor lr is read once)
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            for chunk in self._chunks(params):
                self._orthogonal_update(group, lr, [params[i] for i in chunk], [grads[i] for i in chunk],
                                        [bufs[i] for i in chunk])
        return loss

    def _buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        return state["momentum_buffer"]

    def _chunks(self, params: list[Tensor]) -> list[list[int]]:
        """Indices grouped by (shape, dtype, device), each group cut to max_batch_elements."""
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_kind[(tuple(p.shape), p.dtype, p.device)].append(i)
        out = []
        for (shape, _, _), idx in by_kind.items():
            per = max(1, self.max_batch_elements // max(1, shape[0] * shape[1]))
            out.extend(idx[j:j + per] for j in range(0, len(idx), per))
        return out

    def _orthogonal_update(self, group: dict[str, Any], lr: float, params: list[Tensor], grads: list[Tensor],
                           bufs: list[Tensor]) -> None:
        mu = group["momentum"]
        updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
        rows, cols = params[0].shape
        tall = rows > cols
        x = torch.empty((len(params), rows, cols), dtype=torch.bfloat16, device=params[0].device)
        for j, u in enumerate(updates):
            x[j].copy_(u)
        del updates
        # A tall batch is iterated as its transposed view, as torch's Muon iterates `grad.T`.
        x = newton_schulz(x.mT if tall else x, group["ns_coefficients"], group["ns_steps"], group["eps"])
        out = x.mT if tall else x
        alpha = -_adjusted_lr(lr, group["adjust_lr_fn"], params[0].shape)
        torch._foreach_add_(params, list(out.unbind(0)), alpha=alpha)
