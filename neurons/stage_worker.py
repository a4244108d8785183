"""The compute of one pipeline stage, as a miner (and a validator's replay) runs it. No network.

A `StageWorker` holds its stage's module and inner optimizer and the forward graphs it keeps
open until their backward arrives, keyed by sample id. Weights change only in `inner_step`,
so every hop is a pure function of (the weights at that inner step, the hop's inputs). The
gradient of an inner step is the mean over the samples whose backward ran since the last step.

`dtype` is the compute dtype: float32 runs plainly; bfloat16 / float16 run the stage under
autocast (parameters, gradients and optimizer state stay float32).

Under token re-injection (`needs_tokens`: a stage > 0 with ModelConfig.token_reinject) every
forward also takes the sample's token ids, `data.batch(data_seed, sample_id, ...)[0]`, which
`neurons.hop_exec.run_hop` derives from public data exactly as it derives the last stage's targets.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from resbm import optim, outer
from resbm.stages import build_stages
from resbm.config import ModelConfig

__all__ = ["StageWorker", "WorkerError", "global_inner_step", "optim_config", "worker_for_run"]

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


def global_inner_step(round_index: int, inner_steps_per_round: int, inner_step: int) -> int:
    """The inner optimizer's step number (its schedule's clock) of inner step `inner_step` of a round."""
    return round_index * inner_steps_per_round + inner_step


class WorkerError(RuntimeError):
    """A hop or step the worker cannot do in its current state (names the sample or the cause)."""


@dataclass
class _Graph:
    inp: torch.Tensor | None  # leaf with requires_grad (stages > 0); None for stage 0
    out: torch.Tensor  # the stage output still attached to the graph


class StageWorker:
    """One stage's module, inner optimizer and open forward graphs."""

    def __init__(
        self,
        model_config: ModelConfig,
        stage_index: int,
        n_stages: int,
        optim_config: "optim.OptimConfig",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        init_seed: int = 0,
        theta: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if n_stages != model_config.n_stages:
            raise WorkerError(f"n_stages ({n_stages}) != model_config.n_stages ({model_config.n_stages})")
        if not 0 <= stage_index < n_stages:
            raise WorkerError(f"stage_index must be in 0..{n_stages - 1}, got {stage_index}")
        if dtype != torch.float32 and dtype not in _AUTOCAST_DTYPES:
            raise WorkerError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        self.cfg = model_config
        self.stage_index = stage_index
        self.n_stages = n_stages
        self.is_first = stage_index == 0
        self.is_last = stage_index == n_stages - 1
        self.device = torch.device(device)
        self.dtype = dtype
        self.optim_config = optim_config
        # Parameters are initialised from (seed, name) alone, so every replica and validator
        # building stage s from init_seed gets the same round-0 theta.
        self.module = build_stages(model_config, seed=init_seed, stages=[stage_index])[0].to(self.device)
        self._names = list(self.module.state_dict().keys())
        self._shapes = {n: tuple(t.shape) for n, t in self.module.state_dict().items()}
        self._graphs: dict[int, _Graph] = {}
        self._samples = 0
        self.optimizer = optim.build_optimizer(self.module, optim_config)
        if theta is not None:
            self.load_theta(theta)

    # ----- state -----
    @property
    def samples_since_step(self) -> int:
        """Samples whose backward ran since the last inner step."""
        return self._samples

    @property
    def open_graphs(self) -> list[int]:
        """Sample ids whose forward graph is still held (sorted)."""
        return sorted(self._graphs)

    @property
    def needs_tokens(self) -> bool:
        """True when forwards (and recomputes) need the sample's token ids besides the input code."""
        return self.module.needs_tokens

    @property
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of this stage's state (the expected shapes of theta and pseudo-gradients)."""
        return dict(self._shapes)

    def theta(self) -> dict[str, torch.Tensor]:
        """Detached fp32 CPU copy of the stage's state, sorted by name."""
        sd = self.module.state_dict()
        return {n: sd[n].detach().to("cpu", torch.float32).clone() for n in sorted(sd)}

    def load_theta(self, theta: Mapping[str, torch.Tensor]) -> None:
        """Load weights (names and shapes checked), drop open graphs and start a fresh optimizer."""
        if set(theta) != set(self._names):
            missing = sorted(set(self._names) - set(theta))
            extra = sorted(set(theta) - set(self._names))
            raise WorkerError(f"theta names do not match stage {self.stage_index}: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
        for n in self._names:
            if tuple(theta[n].shape) != self._shapes[n]:
                raise WorkerError(f"theta {n} has shape {tuple(theta[n].shape)}, expected {self._shapes[n]}")
            if not bool(torch.isfinite(theta[n]).all()):
                raise WorkerError(f"theta {n} contains NaN or Inf")
        with torch.no_grad():
            self.module.load_state_dict({n: theta[n].to(torch.float32) for n in self._names}, strict=True)
        self._graphs.clear()
        self._samples = 0
        self.optimizer = optim.build_optimizer(self.module, self.optim_config)
        self.optimizer.zero_grad()

    def pseudo_gradient(self, theta_start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta_start - current weights (fp32, CPU)."""
        return outer.pseudo_gradient(theta_start, self.theta())

    # ----- hops -----
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _prepare_input(self, inp: torch.Tensor) -> torch.Tensor | None:
        if self.is_first:
            if inp.dtype != torch.int64 or inp.dim() != 2:
                raise WorkerError(f"stage 0 input must be int64 token ids (B, T), got {inp.dtype} {tuple(inp.shape)}")
            return None
        if inp.dim() != 3 or inp.shape[-1] != self.cfg.code_dim or not inp.is_floating_point():
            raise WorkerError(f"stage {self.stage_index} input must be a float code (B, T, {self.cfg.code_dim}), "
                              f"got {inp.dtype} {tuple(inp.shape)}")
        if not bool(torch.isfinite(inp).all()):
            raise WorkerError("input code contains NaN or Inf")
        return inp.detach().to(self.device, torch.float32).requires_grad_(True)

    def _prepare_tokens(self, sample_id: int, tokens: torch.Tensor | None) -> torch.Tensor | None:
        if not self.needs_tokens:
            return None
        if tokens is None:
            raise WorkerError(f"sample {sample_id}: stage {self.stage_index} needs the sample's token ids "
                              "(token_reinject): pass tokens=data.batch(data_seed, sample_id, ...)[0]")
        return tokens.to(self.device)

    def forward(self, sample_id: int, inp: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage on tokens (stage 0) or a decoded code (plus the sample's `tokens` when
        `needs_tokens`); keep the graph; return the code."""
        if self.is_last:
            raise WorkerError("the last stage runs forward_backward, not forward")
        if sample_id in self._graphs:
            raise WorkerError(f"sample {sample_id}: a forward graph is already open")
        leaf = self._prepare_input(inp)
        x = inp.to(self.device) if leaf is None else leaf
        side = self._prepare_tokens(sample_id, tokens)
        with self._autocast():
            out = self.module(x, tokens=side)
        self._graphs[sample_id] = _Graph(inp=leaf, out=out)
        return out.detach().to("cpu", torch.float32).clone()

    def forward_backward(
        self, sample_id: int, code: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[float, torch.Tensor | None]:
        """Last stage: forward to the loss (`tokens` when `needs_tokens`), backward; returns (loss,
        gradient of the input code)."""
        if not self.is_last:
            raise WorkerError("forward_backward is for the last stage only")
        leaf = self._prepare_input(code)
        x = code.to(self.device) if leaf is None else leaf
        side = self._prepare_tokens(sample_id, tokens)
        with self._autocast():
            loss = self.module(x, targets.to(self.device), tokens=side)
        loss.backward()
        self._samples += 1
        grad = None if leaf is None else leaf.grad.detach().to("cpu", torch.float32).clone()
        return float(loss.detach()), grad

    def backward(
        self, sample_id: int, grad_output: torch.Tensor, recompute_input: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Backward of an open forward (or recompute it from `recompute_input`, with `tokens` when
        `needs_tokens`); input grad or None."""
        if self.is_last:
            raise WorkerError("the last stage runs forward_backward, not backward")
        if sample_id not in self._graphs:
            if recompute_input is None:
                raise WorkerError(f"sample {sample_id}: no open forward graph and no input to recompute it")
            self.forward(sample_id, recompute_input, tokens)
        graph = self._graphs[sample_id]
        if tuple(grad_output.shape) != tuple(graph.out.shape):
            raise WorkerError(f"sample {sample_id}: grad_output shape {tuple(grad_output.shape)} "
                              f"!= output shape {tuple(graph.out.shape)}")
        if not bool(torch.isfinite(grad_output).all()):
            raise WorkerError(f"sample {sample_id}: grad_output contains NaN or Inf")
        del self._graphs[sample_id]  # dropped whatever happens next: the graph is freed after backward
        graph.out.backward(grad_output.to(self.device, graph.out.dtype))
        self._samples += 1
        if graph.inp is None:
            return None
        return graph.inp.grad.detach().to("cpu", torch.float32).clone()

    def discard_gradients(self) -> int:
        """Drop the gradients accumulated since the last step without stepping; returns their count."""
        n, self._samples = self._samples, 0
        self.optimizer.zero_grad()
        return n

    def release(self, sample_id: int) -> bool:
        """Drop an abandoned forward graph; True if one was open."""
        return self._graphs.pop(sample_id, None) is not None

    # ----- inner step -----
    def close_inner_step(self, global_step: int, step: Optional[Callable[[int], Any]] = None) -> list[int]:
        """An inner-step boundary as the bridge announces it (the miner's loop and the audit's
        replay alike): drop the forward graphs the bridge abandoned, then step at `global_step`
        (through `step`, default `inner_step`) when any sample's gradient accumulated. Returns
        the dropped sample ids."""
        dropped = self.open_graphs
        for sid in dropped:
            self.release(sid)
        if self._samples > 0:
            (step or self.inner_step)(global_step)
        return dropped

    def inner_step(self, global_step: int) -> int:
        """Mean the accumulated gradients, step the optimizer at `global_step`, zero them; returns
        the number of samples stepped on. Refuses with open graphs or nothing accumulated."""
        if self._graphs:
            raise WorkerError(f"cannot step with open forward graphs for samples {self.open_graphs[:5]}")
        if self._samples == 0:
            raise WorkerError("cannot step: no sample's gradient accumulated since the last step")
        n = self._samples
        with torch.no_grad():
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.div_(n)
        self.optimizer.step(global_step)
        self.optimizer.zero_grad()
        self._samples = 0
        log.debug("stage %d: inner step %d on %d samples", self.stage_index, global_step, n)
        return n


def optim_config(run) -> "optim.OptimConfig":
    """Inner optimizer settings of a run (a protocol RunConfig)."""
    return optim.OptimConfig(muon_lr=run.muon_lr, adamw_lr=run.adamw_lr, weight_decay=run.weight_decay,
                             warmup_steps=run.warmup_steps, total_steps=run.total_steps,
                             min_lr_ratio=run.min_lr_ratio)


def worker_for_run(run, stage: int, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> StageWorker:
    """The stage as a run defines it, at its round-0 weights: what miners and validators both build."""
    return StageWorker(ModelConfig.from_dict(run.model), stage, run.n_stages, optim_config(run), device, dtype,
                       init_seed=run.init_seed)
