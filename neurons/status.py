"""The miner's periodic status line: hops/s, tokens/s, compute fraction, a hop's wall time over
its compute, bytes moved, last loss; the summary also carries where the wall time went (TimeBook)."""
from __future__ import annotations

import logging
import time

from protocol.lifecycle import HopKind
from neurons.timebook import TimeBook, hop_wall_ratio

__all__ = ["MinerStatus"]

log = logging.getLogger("miner")


class MinerStatus:
    """Counters and a rate-limited one-line status print."""

    def __init__(self, transfer_stats, book: TimeBook | None = None, every: float = 10.0):
        self.transfer = transfer_stats
        self.book = book or TimeBook()
        self.every = every
        self.started = time.monotonic()
        self._last_print = self.started
        self.stage = self.round = -1
        self.hops_done = self.steps = self.bad_inputs = 0
        self.step_mismatches = 0
        self.hops_computed = 0
        self.tokens = 0
        self.compute_seconds = 0.0
        self.last_loss: float | None = None
        self.first_hop_at: float | None = None
        self.last_hop_at: float | None = None
        self._applied: set = set()
        self.duplicate_steps = 0
        self.listeners: list = []  # called as f(seconds, hop) per computed hop (metrics)
        self.requests = None  # a neurons.request_log.RequestLog: its summary goes into `summary()`

    def record_step(self, key: tuple) -> None:
        """Count an applied optimizer step; a (round, inner_step) applied twice is a bug we report."""
        if key in self._applied:
            self.duplicate_steps += 1
        self._applied.add(key)
        self.steps += 1

    def set_stage(self, stage: int, rnd: int) -> None:
        """Remember the stage and round for the status line."""
        self.stage, self.round = stage, rnd

    def add_compute(self, seconds: float, hop, tokens: int, loss: float | None) -> None:
        """Account one computed hop."""
        now = time.monotonic()
        if self.first_hop_at is None:
            self.first_hop_at = now - seconds
        self.last_hop_at = now
        self.compute_seconds += seconds
        self.hops_computed += 1
        if hop.kind != HopKind.BWD:
            self.tokens += tokens
        if loss is not None:
            self.last_loss = loss
        for listener in self.listeners:
            listener(seconds, hop)

    def summary(self) -> dict:
        """Counters as a dict (also written to the status file the localnet reads)."""
        wall = max(1e-9, time.monotonic() - self.started)
        active = (self.last_hop_at - self.first_hop_at) if self.first_hop_at is not None else 0.0
        time_book = self.book.summary()
        return {"time": time_book, "hop_wall_ratio": hop_wall_ratio(time_book["main"]),
                "hops_computed": self.hops_computed,
                "stage": self.stage, "round": self.round, "hops_done": self.hops_done,
                "hops_per_s": self.hops_computed / wall, "tokens_per_s": self.tokens / wall,
                "compute_fraction": self.compute_seconds / wall, "compute_seconds": self.compute_seconds,
                "wall_seconds": wall, "active_seconds": active,
                "active_compute_fraction": self.compute_seconds / active if active > 0 else 0.0,
                "bytes_up": self.transfer.bytes_up, "bytes_down": self.transfer.bytes_down,
                "net_seconds": self.transfer.seconds_up + self.transfer.seconds_down,
                "steps": self.steps, "duplicate_steps": self.duplicate_steps, "bad_inputs": self.bad_inputs,
                "step_mismatches": self.step_mismatches, "last_loss": self.last_loss,
                **({"requests": self.requests.summary()} if self.requests is not None else {})}

    def maybe_print(self, rnd: int, inner_step: int) -> None:
        """Log the status line if `every` seconds passed since the last one."""
        now = time.monotonic()
        if now - self._last_print < self.every:
            return
        self._last_print = now
        s = self.summary()
        loss = "-" if s["last_loss"] is None else f"{s['last_loss']:.3f}"
        gpu = _gpu_text()
        ratio = "-" if s["hop_wall_ratio"] is None else f"{s['hop_wall_ratio']:.1f}x"
        log.info("stage %d round %d step %d | %d hops %.1f hops/s %.0f tok/s | compute %.0f%%, hop wall %s "
                 "compute | up %.1f MB down %.1f MB | loss %s%s", self.stage, rnd, inner_step, s["hops_done"],
                 s["hops_per_s"], s["tokens_per_s"], 100 * s["compute_fraction"], ratio,
                 s["bytes_up"] / 1e6, s["bytes_down"] / 1e6, loss, gpu)


def _gpu_text() -> str:
    """' | gpu 87% 12.3 GB' on CUDA (utilisation needs NVML; memory always shows), else ''."""
    try:
        import torch
        if not torch.cuda.is_available():
            return ""
        mem = torch.cuda.max_memory_allocated() / 1e9
        try:
            return f" | gpu {torch.cuda.utilization()}% {mem:.1f} GB"
        except Exception:  # no NVML bindings installed
            return f" | gpu mem {mem:.1f} GB"
    except Exception:
        return ""
