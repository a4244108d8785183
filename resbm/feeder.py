"""Each training step's micro-batches on the device, prepared ahead so the loop never waits on data."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from . import data

__all__ = ["BatchFeeder"]

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchFeeder:
    """Step s's micro-batches are data.batch(seed, s*A + m) for m < A, as (tokens, targets) on `device`.

    With depth > 0 the next `depth` steps are read on a background thread; on CUDA into pinned memory,
    copied with non_blocking=True, so neither the read nor the copy makes the host wait for the GPU.
    With depth 0 each step is read when asked for."""

    def __init__(self, seed: int, batch_size: int, seq_len: int, accum: int, device: torch.device,
                 depth: int = 2) -> None:
        self.seed, self.batch_size, self.seq_len, self.accum = seed, batch_size, seq_len, accum
        self.device = device
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.depth, self.pin = depth, device.type == "cuda"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-feeder") if depth else None
        self._ahead: dict[int, Future[list[Batch]]] = {}

    def _read(self, step: int) -> list[Batch]:
        out = []
        for m in range(self.accum):
            tokens, targets = data.batch(self.seed, step * self.accum + m, self.batch_size, self.seq_len)
            if self.pin:
                tokens, targets = tokens.pin_memory(), targets.pin_memory()
            out.append((tokens, targets))
        return out

    def get(self, step: int) -> list[Batch]:
        """Step `step`'s micro-batches on the device (and the next steps' reads queued)."""
        if self._pool is None:
            host = self._read(step)
        else:
            for s in [s for s in self._ahead if s < step]:  # skipped steps (e.g. a resume) are dropped
                self._ahead.pop(s).cancel()
            for s in range(step, step + self.depth + 1):
                if s not in self._ahead:
                    self._ahead[s] = self._pool.submit(self._read, s)
            host = self._ahead.pop(step).result()
        return [(t.to(self.device, non_blocking=self.pin), y.to(self.device, non_blocking=self.pin)) for t, y in host]

    def close(self) -> None:
        """Stop the background reads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._ahead.clear()
