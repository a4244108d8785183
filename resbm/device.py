"""Which torch device to run on: the one rule ('auto' -> cuda, then mps, then cpu) that training,
the miner and the validator share."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["auto_device", "cuda_count", "mps_available", "pick_device"]


def cuda_count() -> int:
    """CUDA devices torch can use here (0 on a CPU-only build)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    """True when Apple's MPS backend is usable."""
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def auto_device(cuda: Callable[[], int] = cuda_count, mps: Callable[[], bool] = mps_available) -> str:
    """'cuda' if any CUDA device, else 'mps' if available, else 'cpu' (checks injectable for tests)."""
    return "cuda" if cuda() > 0 else ("mps" if mps() else "cpu")


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> `auto_device()`; anything else is passed to torch.device."""
    return torch.device(auto_device() if name == "auto" else name)
