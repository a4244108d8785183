"""The compute of one pipeline stage, as a miner (and a validator's replay) runs it. No network.

A `StageWorker` holds its stage's module and inner optimizer and the forward graphs it keeps
open until their backward arrives, keyed by sample id. Weights change only in `inner_step`,
so every hop is a pure function of (the weights at that inner step, the hop's inputs). The
gradient of an inner step is the mean over the samples whose backward ran since the last step;
an inner step whose gradient is not finite is skipped (`memory_stats["skipped_steps"]`), so one
absurd input gradient never turns the replica's weights to NaN.

`dtype` is the compute dtype: float32 runs plainly; bfloat16 / float16 run the stage under
autocast (parameters, gradients and optimizer state stay float32).

Memory (neurons/stage_memory.py): the graphs kept between forward and backward hold at most
`max_memory` bytes of saved activations; a forward over it keeps only its input, and its backward
recomputes the forward first (the same result). An out-of-memory error drops every kept graph to
its input and retries, then computes the hop in smaller pieces of the batch; a hop's gradients are
added to the parameters only once it succeeded, so a failed try leaves nothing half done.

Under token re-injection (`needs_tokens`: a stage > 0 with ModelConfig.token_reinject) every
forward also takes the sample's token ids, `data.batch(data_seed, sample_id, ...)[0]`, which
`neurons.hop_exec.run_hop` derives from public data exactly as it derives the last stage's targets.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch

from resbm import optim, outer
from resbm.stages import build_stages
from resbm.config import ModelConfig

from .grad_check import all_finite
from .stage_memory import OOM_WAITS, free_memory, parse_memory, retry_oom, saved_bytes

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
    """A forward whose backward has not come yet: its input (always), and its graph while kept."""

    src: torch.Tensor  # the stage input as given (token ids or a code), on the CPU: to recompute
    tokens: torch.Tensor | None = None  # the sample's token ids (needs_tokens), on the CPU
    inp: torch.Tensor | None = None  # leaf with requires_grad (stages > 0, kept graphs)
    out: torch.Tensor | None = None  # the stage output attached to the graph; None: recompute
    nbytes: int = 0  # what the kept graph saved for backward


class StageWorker:
    """One stage's module, inner optimizer and open forward graphs."""

    oom_waits: tuple[float, ...] = OOM_WAITS
    """Seconds waited before each last try after out-of-memory errors (neurons.stage_memory)."""

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
        max_memory: int | str | None = None,
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
        self._params = [p for p in self.module.parameters() if p.requires_grad]
        self._held = 0  # bytes the kept graphs saved for backward
        self._graph_bytes = 0  # what the last kept graph saved: the next one's estimate
        self.memory_stats: Counter[str] = Counter()
        try:  # after the model is built: 'auto' is half of what is free then
            self.max_memory = parse_memory(max_memory, self.device)
        except ValueError as exc:
            raise WorkerError(str(exc)) from None
        """Bytes of saved activations the kept graphs may hold (None: no budget); lowered after an
        out-of-memory error."""
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
        self._held = 0
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

    def _entry(self, src: torch.Tensor, tokens: torch.Tensor | None) -> _Graph:
        """A pending forward: its input and (needs_tokens) the sample's token ids, on the CPU."""
        side = tokens.detach().cpu() if tokens is not None and self.needs_tokens else None
        return _Graph(src=src.detach().cpu(), tokens=side)

    def _budget_allows(self) -> bool:
        return self.max_memory is None or self._held + self._graph_bytes <= self.max_memory

    def forward(self, sample_id: int, inp: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage on tokens (stage 0) or a decoded code (plus the sample's `tokens` when
        `needs_tokens`); keep the graph (or, over the memory budget, only the input: the backward
        recomputes it); return the code."""
        if self.is_last:
            raise WorkerError("the last stage runs forward_backward, not forward")
        if sample_id in self._graphs:
            raise WorkerError(f"sample {sample_id}: a forward graph is already open")
        self._prepare_input(inp)  # checks it; every attempt below builds its own leaf
        self._prepare_tokens(sample_id, tokens)
        entry = self._entry(inp, tokens)
        out = self._retrying(f"sample {sample_id} forward", entry.src.shape[0],
                             lambda: self._forward_kept(entry) if self._budget_allows() else self._forward_free(entry, 1),
                             lambda n: self._forward_free(entry, n))
        self._graphs[sample_id] = entry
        if entry.out is not None:
            self._held += entry.nbytes
            self._graph_bytes = entry.nbytes
            if self.max_memory is not None and self._held > self.max_memory:
                self._drop(entry)  # measured larger than expected: keep the budget strict
        return out

    def _forward_kept(self, entry: _Graph) -> torch.Tensor:
        leaf = self._prepare_input(entry.src)
        x = entry.src.to(self.device) if leaf is None else leaf
        side = None if entry.tokens is None else entry.tokens.to(self.device)
        with saved_bytes(self._params) as nbytes, self._autocast():
            out = self.module(x, tokens=side)
        entry.inp, entry.out, entry.nbytes = leaf, out, nbytes[0]
        return out.detach().to("cpu", torch.float32).clone()

    def _chunks(self, entry: _Graph, n: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(input, tokens) of `n` near-equal pieces of the batch, on the device."""
        xs = entry.src.to(self.device)
        if not self.is_first:
            xs = xs.to(torch.float32)
        sides = [None] * n if entry.tokens is None else list(entry.tokens.to(self.device).tensor_split(n))
        return list(zip(xs.tensor_split(n), sides))

    def _forward_free(self, entry: _Graph, n: int) -> torch.Tensor:
        """The output without keeping a graph (the backward recomputes it), in `n` pieces."""
        with torch.no_grad(), self._autocast():
            outs = [self.module(x, tokens=side) for x, side in self._chunks(entry, n)]
        self.memory_stats["recomputed_forwards"] += 1
        return torch.cat(outs).to("cpu", torch.float32)

    def forward_backward(
        self, sample_id: int, code: torch.Tensor, targets: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[float, torch.Tensor | None]:
        """Last stage: forward to the loss (`tokens` when `needs_tokens`), backward; returns (loss,
        gradient of the input code)."""
        if not self.is_last:
            raise WorkerError("forward_backward is for the last stage only")
        self._prepare_input(code)
        self._prepare_tokens(sample_id, tokens)
        entry = self._entry(code, tokens)
        loss, grad = self._retrying(f"sample {sample_id} forward_backward", entry.src.shape[0],
                                    lambda: self._backward_pieces(entry, 1, targets=targets),
                                    lambda n: self._backward_pieces(entry, n, targets=targets))
        self._samples += 1
        return loss, grad

    def backward(
        self, sample_id: int, grad_output: torch.Tensor, recompute_input: torch.Tensor | None = None,
        tokens: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Backward of an open forward (or recompute it from `recompute_input`, with `tokens` when
        `needs_tokens`); input grad or None."""
        if self.is_last:
            raise WorkerError("the last stage runs forward_backward, not backward")
        entry = self._graphs.get(sample_id)
        if entry is None:
            if recompute_input is None:
                raise WorkerError(f"sample {sample_id}: no open forward graph and no input to recompute it")
            self._prepare_input(recompute_input)
            self._prepare_tokens(sample_id, tokens)
            entry = self._entry(recompute_input, tokens)
        want = (*entry.src.shape[:2], self.cfg.code_dim)
        if tuple(grad_output.shape) != want:
            raise WorkerError(f"sample {sample_id}: grad_output shape {tuple(grad_output.shape)} != output shape {want}")
        if not bool(torch.isfinite(grad_output).all()):
            raise WorkerError(f"sample {sample_id}: grad_output contains NaN or Inf")
        self.release(sample_id)  # dropped whatever happens next: the graph is freed after backward
        _, grad = self._retrying(f"sample {sample_id} backward", entry.src.shape[0],
                                 lambda: self._backward_pieces(entry, 1, grad_output=grad_output),
                                 lambda n: self._backward_pieces(entry, n, grad_output=grad_output),
                                 entry=entry)
        self._samples += 1
        return grad

    def _backward_pieces(self, entry: _Graph, n: int, grad_output: torch.Tensor | None = None,
                         targets: torch.Tensor | None = None) -> tuple[float, torch.Tensor | None]:
        """Gradients of one sample from its kept graph, or recomputed in `n` pieces (the loss of the
        last stage weighted by each piece's share); added to the parameters' gradients only once
        every piece succeeded, so an out-of-memory error leaves them as they were."""
        params = self._params
        if entry.out is not None and n == 1:
            pieces = [(entry.inp, entry.out, grad_output, 1.0)]
        else:
            entry.inp = entry.out = None
            pieces = []
            gs = [None] * n if grad_output is None else list(grad_output.tensor_split(n))
            ts = [None] * n if targets is None else list(targets.tensor_split(n))
            for (x, side), g, t in zip(self._chunks(entry, n), gs, ts):
                leaf = None if self.is_first else x.detach().requires_grad_(True)
                with self._autocast():
                    out = self.module(x if leaf is None else leaf, *(() if t is None else (t.to(self.device),)),
                                      tokens=side)
                pieces.append((leaf, out, g, x.shape[0] / entry.src.shape[0]))
        sums, input_grads, loss = None, [], 0.0
        for leaf, out, g, share in pieces:
            wrt = params + ([leaf] if leaf is not None else [])
            if g is None:  # the last stage: out is the loss
                loss += share * float(out.detach())
                seed = out if share == 1.0 else out * share
                grads = torch.autograd.grad(seed, wrt, allow_unused=True)
            else:
                grads = torch.autograd.grad(out, wrt, grad_outputs=g.to(self.device, out.dtype), allow_unused=True)
            sums = list(grads[:len(params)]) if sums is None else [
                a if b is None else (b if a is None else a + b) for a, b in zip(sums, grads[:len(params)])]
            if leaf is not None:
                input_grads.append(grads[-1])
        for p, g in zip(params, sums):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        grad_in = torch.cat(input_grads).detach().to("cpu", torch.float32).clone() if input_grads else None
        return loss, grad_in

    def discard_gradients(self) -> int:
        """Drop the gradients accumulated since the last step without stepping; returns their count."""
        n, self._samples = self._samples, 0
        self.optimizer.zero_grad()
        return n

    def release(self, sample_id: int) -> bool:
        """Drop an abandoned forward graph; True if one was open."""
        entry = self._graphs.pop(sample_id, None)
        if entry is not None and entry.out is not None:
            self._held -= entry.nbytes
        return entry is not None

    # ----- memory -----
    def _drop(self, entry: _Graph) -> None:
        """Keep only the input of a kept graph: its backward recomputes the rest."""
        if entry.out is not None:
            self._held -= entry.nbytes
            entry.inp = entry.out = None
            self.memory_stats["dropped_graphs"] += 1

    def _relieve(self, what: str, exc: BaseException, entry: _Graph | None = None) -> None:
        held = self._held
        for g in self._graphs.values():
            self._drop(g)
        if entry is not None:  # the hop's own graph (already released): recompute it too
            entry.inp = entry.out = None
        free_memory(self.device)
        if held and (self.max_memory is None or self.max_memory > held // 2):
            self.max_memory = held // 2  # what it held when memory ran out was too much
        self.memory_stats["oom_retries"] += 1
        log.warning("%s: out of memory (%s); dropped the kept graphs (%.1f MB) to their inputs, activation "
                    "budget now %s; retrying", what, str(exc).splitlines()[0][:120], held / 1e6,
                    "none" if self.max_memory is None else f"{self.max_memory / 1e6:.1f} MB")

    def _retrying(self, what: str, batch: int, full, pieces, entry: _Graph | None = None):
        try:
            return retry_oom(batch, full, pieces, lambda exc: self._relieve(what, exc, entry), self.oom_waits)
        except MemoryError as exc:
            raise WorkerError(f"{what}: {exc}") from None

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
        the number of samples stepped on (0: skipped, the gradient was not finite). Refuses with
        open graphs or nothing accumulated."""
        if self._graphs:
            raise WorkerError(f"cannot step with open forward graphs for samples {self.open_graphs[:5]}")
        if self._samples == 0:
            raise WorkerError("cannot step: no sample's gradient accumulated since the last step")
        n = self._samples
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not all_finite(grads):  # one bad input must not turn the replica's weights to NaN
            self.optimizer.zero_grad()
            self._samples = 0
            self.memory_stats["skipped_steps"] += 1
            log.error("stage %d: inner step %d skipped: the gradient of its %d samples is not finite "
                      "(an input gradient too large for fp32?); the weights are unchanged",
                      self.stage_index, global_step, n)
            return 0
        with torch.no_grad():
            for g in grads:
                g.div_(n)
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
                   dtype: torch.dtype = torch.float32, max_memory: int | str | None = None) -> StageWorker:
    """The stage as a run defines it, at its round-0 weights: what miners and validators both build
    (`max_memory`: the miner's activation budget, neurons.stage_memory.parse_memory)."""
    return StageWorker(ModelConfig.from_dict(run.model), stage, run.n_stages, optim_config(run), device, dtype,
                       init_seed=run.init_seed, max_memory=max_memory)
