"""One hop, from its inputs to its output: the single function the miner runs and the
validator's replay re-runs. No network.

Replayability rests on both sides deriving the same tokens, targets and stage input for every
hop kind; `run_hop` is the only place that does it, so they cannot drift apart. Inputs arrive
decoded (`neurons.objects.fetch_inputs` decides which objects a hop needs from the same
`needs_activation` / `needs_gradient` rules); what to do with the output (upload it, or compare
it with a claim) is the caller's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.lifecycle import HopKind
from resbm import data
from neurons.stage_worker import StageWorker, WorkerError
from spec.dataset import DatasetRef

__all__ = ["HOP_KINDS", "HopOutput", "PublicData", "needs_activation", "needs_gradient", "run_hop"]

HOP_KINDS = tuple(k.value for k in HopKind)


@dataclass(frozen=True)
class PublicData:
    """The run's public data a hop's tokens and targets come from."""

    data_seed: int
    batch_size: int
    dataset: DatasetRef | None = None  # the run config's; None: the shipped corpus

    def batch(self, sample_id: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) of one sample: stage 0's input, re-injection's ids, the loss targets."""
        return data.batch(self.data_seed, sample_id, self.batch_size, seq_len, dataset=self.dataset)


@dataclass
class HopOutput:
    """What a hop produces: the code (fwd) or the input gradient (bwd, fwdbwd; None on stage 0),
    and the loss (fwdbwd)."""

    out: torch.Tensor | None
    loss: float | None = None


def needs_activation(kind: str, recompute: bool) -> bool:
    """True when the hop runs a forward: it needs the stage input (an activation on stages > 0)."""
    return kind != HopKind.BWD or recompute


def needs_gradient(kind: str) -> bool:
    """True when the hop needs the gradient of the stage output (from the next stage)."""
    return kind == HopKind.BWD


def run_hop(worker: StageWorker, kind: str, sample_id: int, recompute: bool, act: torch.Tensor | None,
            grad: torch.Tensor | None, public: PublicData) -> HopOutput:
    """Compute one hop on `worker` (fp32 CPU outputs, before wire encoding); raises WorkerError.

    A fwd for a sample whose graph is open replaces it (the bridge re-issued it). A bwd recomputes its
    forward when told to (the graph, if any, is dropped first) or when no
    graph is open for the sample: stage 0 from the public tokens, other stages only from `act`."""
    if kind not in HOP_KINDS:
        raise WorkerError(f"unknown hop kind {kind!r}; expected one of {HOP_KINDS}")
    recompute = kind == HopKind.BWD and (recompute or sample_id not in worker.open_graphs)
    tokens = targets = None
    if kind == HopKind.FWDBWD or (needs_activation(kind, recompute) and (worker.is_first or worker.needs_tokens)):
        tokens, targets = public.batch(sample_id, worker.cfg.seq_len)
    inp = tokens if worker.is_first else act
    side = tokens if worker.needs_tokens else None
    if kind != HopKind.BWD and inp is None:
        raise WorkerError(f"sample {sample_id}: {kind} hop has no input code")
    if kind == HopKind.FWD:
        if sample_id in worker.open_graphs:  # the bridge re-issued this forward (a retry, a rewind, our
            worker.release(sample_id)        # re-registration): the graph we hold is stale, not a conflict
        return HopOutput(worker.forward(sample_id, inp, side))
    if kind == HopKind.FWDBWD:
        loss, input_grad = worker.forward_backward(sample_id, inp, targets, side)
        return HopOutput(input_grad, loss)
    if grad is None:
        raise WorkerError(f"sample {sample_id}: bwd hop has no output gradient")
    if recompute:
        if inp is None:
            raise WorkerError(f"sample {sample_id}: no open forward graph and no input code to recompute it")
        worker.release(sample_id)
    return HopOutput(worker.backward(sample_id, grad, recompute_input=inp if recompute else None, tokens=side))
