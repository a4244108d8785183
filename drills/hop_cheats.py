"""Hop-level adversarial behaviours (what a cheater uploads instead of honest work).

`honest` changes nothing. The others are what validators must catch:
`random` (random outputs), `stale` (reports inner steps without taking them), `copy` (uploads an
earlier hop's output or input gradient instead of this one's: on a pipeline with replicas, what
copying a neighbour's work looks like to the auditor), `lazy` (scales gradients down by `lazy_scale`,
zero by default), `phantom` (reports hops done without uploading their outputs).
"""
from __future__ import annotations

import torch

__all__ = ["CHEATS", "Cheat"]

CHEATS = ("honest", "random", "stale", "copy", "lazy", "phantom")
"""Kinds this module knows; drills.cheaters maps each to a Miner subclass."""


class Cheat:
    """What a hop-level cheater does at each point it deviates from the honest miner."""

    def __init__(self, kind: str = "honest", lazy_scale: float = 0.0, seed: int = 0):
        if kind not in CHEATS:
            raise ValueError(f"unknown cheat {kind!r}; choose one of {', '.join(CHEATS)}")
        self.kind, self.lazy_scale = kind, lazy_scale
        self._gen = torch.Generator().manual_seed(seed)
        self._previous: torch.Tensor | None = None
        self._previous_grad: torch.Tensor | None = None

    def forward_output(self, out: torch.Tensor, hop) -> torch.Tensor:
        """The activation a cheater uploads for a forward hop."""
        if self.kind == "random":
            return torch.randn(out.shape, generator=self._gen) * out.std()
        if self.kind == "copy":
            prev, self._previous = self._previous, out
            return out if prev is None else prev
        return out

    def input_grad(self, grad: torch.Tensor | None, hop) -> torch.Tensor | None:
        """The input gradient a cheater uploads."""
        if grad is None:
            return None
        if self.kind == "lazy":
            return grad * self.lazy_scale
        if self.kind == "random":
            return torch.randn(grad.shape, generator=self._gen) * grad.std()
        if self.kind == "copy":
            prev, self._previous_grad = self._previous_grad, grad
            return grad if prev is None else prev
        return grad

    def pseudo_gradient(self, pg: dict) -> dict:
        """The pseudo-gradient a cheater uploads."""
        if self.kind == "lazy":
            return {k: v * self.lazy_scale for k, v in pg.items()}
        return pg

    def skip_step(self) -> bool:
        """Whether to skip the optimizer step (stale weights)."""
        return self.kind == "stale"

    def skip_upload(self, hop) -> bool:
        """Whether to claim a hop without uploading its output."""
        return self.kind == "phantom"
