"""Where a training step's time goes (CUDA events at phase boundaries), and the MFU estimate."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

__all__ = ["PhaseTimer", "mfu", "peak_flops", "peak_flops_of", "synchronize"]

# Dense bf16 peak FLOP/s by GPU name fragment, most specific first (datasheet figures, no sparsity).
_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
               ("H800", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12))


def peak_flops_of(gpu_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (torch.cuda.get_device_name), None if not in the table."""
    return next((v for k, v in _PEAK_FLOPS if k in gpu_name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, or None (a CPU, or a GPU not in the table)."""
    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def mfu(flops_per_token: float, tokens_per_s: float, device: torch.device) -> float | None:
    """Model FLOPs utilisation: flops_per_token * tokens_per_s / the device's peak (None if unknown)."""
    peak = peak_flops(device)
    return flops_per_token * tokens_per_s / peak if peak else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Seconds per named phase, summed over every time the phase ran.

    On a CUDA device each phase is bracketed by two events on the current stream, so its time is the
    GPU's time between the points where the host entered and left the phase (queued work included,
    and idle gaps the host left); nothing is read back until `totals()`, so timing adds no sync.
    Elsewhere the host clock is used. `host` holds the host's own seconds in each phase (where the
    Python code waited, e.g. on a sync). A disabled timer does nothing."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self._cuda = enabled and device.type == "cuda"
        self._marks: list[tuple[str, object, object]] = []
        self.host: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as phase `name`."""
        if not self.enabled:
            yield
            return
        h0 = time.perf_counter()
        start = self._mark()
        try:
            yield
        finally:
            self._marks.append((name, start, self._mark()))
            self.host[name] += time.perf_counter() - h0

    def _mark(self) -> object:
        if not self._cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def totals(self) -> dict[str, float]:
        """{phase: seconds} over everything timed since the last reset (waits for the device once)."""
        out: dict[str, float] = defaultdict(float)
        if self._cuda and self._marks:
            synchronize(self.device)
        for name, a, b in self._marks:
            out[name] += a.elapsed_time(b) / 1e3 if self._cuda else b - a  # type: ignore[union-attr, operator]
        return dict(out)

    def reset(self) -> None:
        """Forget everything timed so far."""
        self._marks.clear()
        self.host.clear()
