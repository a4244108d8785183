"""Memory of a stage's compute: the activation budget, out-of-memory errors, and what a graph holds.

A `StageWorker` keeps a forward's graph (its saved activations) until the sample's backward comes.
Those graphs are most of a miner's memory at real size, so they get a budget (`--max-memory`): a
forward that would go over it keeps only its input and recomputes the graph at its backward. An
out-of-memory error is not a failed hop: the worker drops every kept graph to its input, frees
the allocator's cache, lowers its budget and tries again, then in smaller pieces of the batch, then
later (neurons/stage_worker.py). No network, no state of its own.
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

__all__ = ["is_oom", "free_memory", "saved_bytes", "parse_memory", "device_memory", "retry_oom", "OOM_WAITS"]

T = TypeVar("T")

OOM_WAITS = (0.5, 1.0, 2.0)
"""Seconds to wait before each last try at one sequence at a time (other processes may free memory)."""

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def is_oom(exc: BaseException) -> bool:
    """True for an allocator's out-of-memory error (CUDA, MPS or the CPU's)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _halvings(batch: int) -> list[int]:
    """Piece counts to try after an out-of-memory error: 2, 4, ... up to one sequence each."""
    out, n = [], 2
    while n < batch:
        out.append(n)
        n *= 2
    return out + ([batch] if batch > 1 else [])


def retry_oom(batch: int, full: Callable[[], T], pieces: Callable[[int], T],
              relieve: Callable[[BaseException], None], waits: tuple[float, ...] = OOM_WAITS) -> T:
    """`full()`; after each out-of-memory error `relieve(exc)` (free memory) and try again: the
    whole once more, then in 2, 4, ... pieces of the batch, then one sequence at a time after
    waiting `waits` seconds before each last try. MemoryError when nothing fits; any other error is raised as it is."""
    tries: list[tuple[float, Callable[[], T]]] = [(0.0, full), (0.0, full)]
    tries += [(0.0, lambda n=n: pieces(n)) for n in _halvings(batch)]
    tries += [(w, lambda: pieces(batch)) for w in waits]
    for wait, attempt in tries:
        if wait:
            time.sleep(wait)
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are retried
            if not is_oom(exc):
                raise
            relieve(exc)
    raise MemoryError(f"out of memory even one sequence at a time after waiting {sum(waits):g} s; "
                      "give the miner more memory (--max-memory, fewer processes on the device) or a "
                      "smaller batch")


def free_memory(device: torch.device) -> None:
    """Give freed blocks back: collect garbage, empty the device allocator's cache."""
    gc.collect()
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


@contextlib.contextmanager
def saved_bytes(params: list[torch.Tensor]) -> Iterator[list[int]]:
    """Count the bytes autograd saves for backward inside the block (each storage once; the
    parameters themselves are not counted: they are held anyway). Yields a one-item list."""
    own = {p.untyped_storage().data_ptr() for p in params}
    seen: set[int] = set()
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in own and ptr not in seen:
            seen.add(ptr)
            total[0] += s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of the device (CPU: available and physical RAM), or None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            return page * os.sysconf("SC_AVPHYS_PAGES"), page * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            return None
    return None


def parse_memory(spec: str | int | None, device: torch.device) -> int | None:
    """The activation budget in bytes from `--max-memory`: 'auto' (half the device's free memory
    once the model is built; none on a CPU), 'none' or '0' (no budget), a size ('24GiB', '500MB',
    '1e9') or a fraction of the device's total memory ('0.4'). ValueError naming the problem."""
    if spec is None:
        return None
    if isinstance(spec, int):
        return spec if spec > 0 else None
    text = spec.strip().lower()
    if text in ("none", "0", ""):
        return None
    if text == "auto":
        if device.type == "cpu":
            return None
        mem = device_memory(device)
        return None if mem is None else mem[0] // 2
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)", text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"--max-memory {spec!r}: give auto, none, a size such as 24GiB or 500MB, or a "
                         f"fraction of the device such as 0.4")
    value = float(m.group(1))
    if m.group(2) == "" and 0 < value < 1:
        mem = device_memory(device)
        if mem is None:
            raise ValueError(f"--max-memory {spec!r}: a fraction needs a device whose memory is known; "
                             "give a size such as 24GiB")
        return int(value * mem[1])
    if value < 1:
        raise ValueError(f"--max-memory {spec!r} must be a positive size or a fraction in (0, 1)")
    return int(value * _UNITS[m.group(2)])
