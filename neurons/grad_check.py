"""One question about accumulated gradients, asked with a single device sync: are they all finite?"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["all_finite"]


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (True for none); one host sync in all."""
    if not tensors:
        return True
    norms = torch.stack([t.detach().float().norm() for t in tensors])  # inf or NaN wherever any element is
    return bool(torch.isfinite(norms.sum()))
