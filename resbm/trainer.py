"""One optimizer step of the single-process reference trainer, queued on the device without a host sync.

Step t consumes micro-batches with sample ids t*A .. t*A+A-1 (prepared ahead by `BatchFeeder`);
each runs forward and backward through every stage (`resbm.stages.pipeline_loss`, codes and their
gradients through the wire fake-quantiser); the accumulated gradients are divided by A with one
foreach op (the mean over the step's samples, as miners compute it); Muon then AdamW step on the
schedule's lr. With `outer_every = H` every H-th step is followed by the outer step of a lone
replica per stage (`resbm.outer_local`), and the inner optimizer starts fresh. The losses stay on
the device: the caller reads them when it logs. Each phase runs under `timer.phase(name)`
(data, fwd_bwd, grad_mean, muon, adamw, outer), which scripts/bench_trainer.py times with CUDA events.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .feeder import BatchFeeder
from .optim import InnerOptimizer, OptimConfig, build_optimizer
from .outer_local import LocalOuterStep
from .stages import Stage, pipeline_loss
from .timing import PhaseTimer

__all__ = ["LoopSettings", "Trainer", "compile_blocks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    """How the reference trainer runs its steps (none of it changes what a step computes, except
    `amp`, and `compile` within kernel rounding)."""

    batch_size: int = 8
    """Sequences per micro-batch (a subnet sample)."""
    accum: int = 1
    """Micro-batches per optimizer step (A)."""
    seed: int = 0
    """Data seed of data.batch."""
    amp: bool = False
    """bf16 autocast for the forwards (CUDA)."""
    compile: bool = False
    """torch.compile every transformer block (opt-in; the first steps pay the compile)."""
    prefetch: int = 2
    """Steps of micro-batches read ahead on a thread (CUDA only: on a CPU the thread would compete with
    the compute for the same cores)."""
    outer_every: int = 0
    """H: an outer step after every H inner steps (0: none)."""
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    muon_impl: str = "batched"
    """'batched' (resbm.muon) or 'torch' (torch.optim.Muon, for comparison)."""
    fused_adamw: bool | None = None
    """None: the fused AdamW kernel exactly when the weights are on CUDA."""


def compile_blocks(stages: list[Stage]) -> int:
    """torch.compile every transformer block in place (regional compilation: blocks of one shape share
    one compiled graph, so 20 blocks compile about as fast as one); returns how many."""
    import torch._dynamo  # noqa: F401  (loads dynamo's config)

    config = torch._dynamo.config
    for knob in ("cache_size_limit", "recompile_limit"):  # named differently across torch versions
        if hasattr(config, knob):
            setattr(config, knob, max(64, getattr(config, knob)))
    n = 0
    for stage in stages:
        for block in stage.blocks.values():
            block.compile()
            n += 1
    return n


class Trainer:
    """The stages (already on `device`), their inner optimizer, the data feeder and the outer step."""

    def __init__(self, stages: list[Stage], cfg: ModelConfig, ocfg: OptimConfig, device: torch.device,
                 settings: LoopSettings, timer: PhaseTimer | None = None) -> None:
        if settings.batch_size < 1 or settings.accum < 1 or settings.outer_every < 0:
            raise ValueError(f"need batch_size >= 1, accum >= 1, outer_every >= 0; got {settings.batch_size}, "
                             f"{settings.accum}, {settings.outer_every}")
        if settings.amp and device.type != "cuda":
            raise ValueError(f"amp (bf16 autocast) needs a CUDA device, got {device}")
        self.stages, self.cfg, self.ocfg, self.device, self.settings = stages, cfg, ocfg, device, settings
        self.holder = nn.ModuleList(stages)
        self.params = list(self.holder.parameters())
        self.timer = timer or PhaseTimer(device, enabled=False)
        self.amp = torch.bfloat16 if settings.amp else None
        if settings.compile:
            log.info("compiled %d transformer blocks (the first steps compile them)", compile_blocks(stages))
        self.opt: InnerOptimizer | None = self._new_optimizer()
        self.feeder = BatchFeeder(settings.seed, settings.batch_size, cfg.seq_len, settings.accum, device,
                                  depth=settings.prefetch if device.type == "cuda" else 0)
        self.outer = None
        if settings.outer_every:
            state = [t for s in stages for t in s.state_dict().values()]  # shares storage with the weights
            self.outer = LocalOuterStep(state, settings.outer_lr, settings.outer_momentum)

    def _new_optimizer(self) -> InnerOptimizer:
        return build_optimizer(self.holder, self.ocfg, muon_impl=self.settings.muon_impl,
                               fused_adamw=self.settings.fused_adamw)

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step consumes."""
        return self.settings.accum * self.settings.batch_size * self.cfg.seq_len

    def step(self, step: int) -> torch.Tensor:
        """Run optimizer step `step`; returns its A micro-batch losses as a device tensor (not read)."""
        t, a = self.timer, self.settings.accum
        assert self.opt is not None
        with t.phase("data"):
            batches = self.feeder.get(step)
        with t.phase("fwd_bwd"):
            losses = torch.stack([pipeline_loss(self.stages, x, y, self.amp) for x, y in batches])
        if a > 1:
            with t.phase("grad_mean"):
                torch._foreach_div_([p.grad for p in self.params if p.grad is not None], a)
        self.opt.set_lr(step)
        with t.phase("muon"):
            self.opt.step_part("muon")
        with t.phase("adamw"):
            self.opt.step_part("adamw")
        self.opt.zero_grad()
        if self.outer is not None and (step + 1) % self.settings.outer_every == 0:
            with t.phase("outer"):
                self.opt = None  # frees the inner state before the outer step's temporaries
                self.outer.step()
                self.opt = self._new_optimizer()  # the inner optimizer starts fresh each round
        return losses

    def close(self) -> None:
        """Stop the feeder's background reads."""
        self.feeder.close()
