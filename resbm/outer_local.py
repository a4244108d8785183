"""The outer step of a run with one replica per stage, computed where the weights live.

The single-process reference trainer (`resbm.train` with `outer_every`) takes, per stage, the
outer step a lone replica takes in the subnet: pseudo-gradient g = theta_start - theta, merged over
one replica, then `resbm.outer.nesterov_step`. A one-replica merge is the identity up to the sign
of zero (robust_merge, and outer.merge's 'mean' and 'clipped-mean' with clip_factor >= 1, return
0 + g * 1, which turns -0.0 into +0.0). This class computes those same element-wise fp32 operations
in the same order with foreach kernels on the weights' device, instead of copying every weight to
the CPU and back: each operation is one IEEE operation per element (no fused multiply-add), so the
weights are bit-identical to resbm.outer's on any device (tests/test_outer_local.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["LocalOuterStep", "one_replica_merge_is_identity"]


def one_replica_merge_is_identity(method: str, clip_factor: float) -> bool:
    """True when merging a single replica's pseudo-gradient returns it unchanged (robust_merge, mean,
    clipped-mean with clip_factor >= 1); trimmed-mean needs >= 3 replicas, a smaller clip factor scales."""
    return method in ("robust", "mean") or (method == "clipped-mean" and clip_factor >= 1)


class LocalOuterStep:
    """Round-start weights and outer Nesterov momentum of some fp32 tensors (a stage's state), updated
    in place by `step()` exactly as outer.nesterov_step(start, merge([g]), momentum) computes them."""

    def __init__(self, tensors: Sequence[torch.Tensor], lr: float, momentum: float) -> None:
        if not (lr > 0 and math.isfinite(lr)) or not 0 <= momentum < 1:
            raise ValueError(f"need outer lr > 0 and 0 <= outer momentum < 1, got {lr!r}, {momentum!r}")
        if any(t.dtype != torch.float32 for t in tensors):
            raise ValueError("the outer step runs on fp32 weights")
        self.tensors = list(tensors)
        self.lr, self.mu = float(lr), float(momentum)
        self.start = [t.detach().clone() for t in self.tensors]
        self.momentum: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        """theta <- start - lr * (g + mu * m'), m' = mu * m + g (m' = g at round 0); start <- theta."""
        g = torch._foreach_sub(self.start, self.tensors)
        torch._foreach_add_(g, 0.0)  # the merge's 0 + g * 1 (g * 1 == g): -0.0 becomes +0.0
        if self.momentum is None:
            self.momentum = [t.clone() for t in g]
        else:
            torch._foreach_mul_(self.momentum, self.mu)
            torch._foreach_add_(self.momentum, g)
        update = torch._foreach_mul(self.momentum, self.mu)
        torch._foreach_add_(update, g)
        del g
        torch._foreach_mul_(update, self.lr)
        torch._foreach_sub_(self.start, update)
        torch._foreach_copy_(self.tensors, self.start)
