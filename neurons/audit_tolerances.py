"""Which numerics the validator replays a miner in, and which calibrated tolerances then apply.

A miner declares its device class, compute dtype and GPU model at registration; the bridge stamps
them on every hop record. The validator replays in the same class when it has such a device (CPU
always; CUDA or MPS when it runs on one), else on its own device in float32. An `AuditContext` is
what the replay is: the model (its config hash), the miner's numerics and GPU, the replay's. A
`ToleranceTable` judges each hop of one stage by the run config's `audit_tolerances` entry that
matches the context, the hop kind and the hop's inner step, the most specific one winning.

Calibrated or not trusted: a hop no entry covers is judged only by `GROSS_TOLERANCES` (bounds far
above any honest error measured anywhere and far below every cheater kind's) and is marked
uncalibrated; an audit that passes those but had uncalibrated hops ends `uncalibrated`, which
penalises nobody. The one built-in calibration is a CPU miner replayed on a CPU in its own dtype
(the same deterministic kernels: `DEFAULT_TOLERANCES`, measured on tiny CPU models).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from protocol.audit_tolerances import AuditTolerance

from .audit import DEFAULT_TOLERANCES, GROSS_TOLERANCES, Tolerances

__all__ = ["AuditContext", "ToleranceTable", "numerics_key", "replay_numerics", "record_numerics",
           "record_gpu", "device_gpu", "stage_tolerances", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def numerics_key(device_class: str, compute_dtype: str) -> str:
    """'cuda/bfloat16' style key."""
    return f"{device_class}/{compute_dtype}"


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a declared compute dtype name (ValueError for an unknown one)."""
    if name not in _DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def device_gpu(device: str | torch.device) -> str:
    """The GPU model of a CUDA device ('NVIDIA H100 80GB HBM3'); '' for any other device."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return ""
    return torch.cuda.get_device_name(dev)[:64]


def record_numerics(records: Sequence) -> tuple[str, str]:
    """The (device class, dtype) a miner's hop records declare; ValueError when they disagree."""
    seen = {(getattr(r, "device_class", "cpu"), getattr(r, "compute_dtype", "float32")) for r in records}
    if len(seen) != 1:
        raise ValueError(f"hop records declare several numerics in one epoch: {sorted(seen)}")
    return next(iter(seen))


def record_gpu(records: Sequence) -> str:
    """The GPU model a miner's hop records declare ('' for none); ValueError when they disagree."""
    seen = {getattr(r, "device_name", "") for r in records}
    if len(seen) != 1:
        raise ValueError(f"hop records declare several GPU models in one epoch: {sorted(seen)}")
    return next(iter(seen))


def replay_numerics(declared: tuple[str, str], validator_device: str | torch.device) -> tuple[str, str]:
    """(device, dtype) to replay in: the declared class when the validator has it, else its own
    device in float32. `validator_device` is what --device resolved to ('cuda', 'cuda:1', 'cpu')."""
    dev = torch.device(validator_device)
    cls, dtype = declared
    if cls == "cpu":
        return ("cpu", dtype)
    if cls == dev.type:
        return (str(dev), dtype)
    return (str(dev), "float32")


@dataclass(frozen=True)
class AuditContext:
    """What one replay is: model, the miner's declared numerics and GPU, the replay's numerics and GPU."""

    model: str
    miner: tuple[str, str]
    miner_gpu: str
    replay: tuple[str, str]  # (device class, dtype)
    replay_gpu: str

    @property
    def builtin(self) -> bool:
        """A CPU miner replayed on a CPU in its own dtype: the built-in calibration covers it."""
        return self.miner[0] == "cpu" and self.replay == self.miner

    def describe(self) -> str:
        """One line naming the combination (for logs and the owner's dashboard)."""
        def side(numerics: tuple[str, str], gpu: str) -> str:
            return numerics_key(*numerics) + (f" on {gpu}" if gpu else "")
        return (f"model {self.model}, miner {side(self.miner, self.miner_gpu)}, "
                f"replay {side(self.replay, self.replay_gpu)}")


def _matches(e: AuditTolerance, ctx: AuditContext, stage: int) -> bool:
    return (e.model in (ctx.model, "*") and e.miner in (numerics_key(*ctx.miner), "*")
            and e.replay in (numerics_key(*ctx.replay), "*") and e.miner_gpu in (ctx.miner_gpu, "*")
            and e.replay_gpu in (ctx.replay_gpu, "*") and e.stage in (None, stage))


def _specificity(e: AuditTolerance) -> tuple:
    narrow = -(e.step_to - e.step_from) if e.step_to is not None else -10**9
    return (e.stage is not None, e.model != "*", e.miner != "*", e.miner_gpu != "*", e.replay != "*",
            e.replay_gpu != "*", narrow)


def _as_tolerances(e: AuditTolerance) -> Tolerances:
    if e.kind == "pseudograd":
        return Tolerances(pg_rel_err=e.rel_err, pg_min_cosine=e.min_cosine)
    return Tolerances(rel_err=e.rel_err, min_cosine=e.min_cosine, norm_ratio=e.norm_ratio,
                      loss_abs=e.loss_abs, loss_rel=e.loss_rel)


@dataclass
class ToleranceTable:
    """The tolerances of one stage's hops in one `AuditContext` (neurons.audit asks `lookup`)."""

    context: AuditContext
    stage: int
    entries: list[AuditTolerance]
    """The run's entries that match the context and the stage."""

    def lookup(self, kind: str, inner_step: int) -> tuple[Tolerances, bool]:
        """(thresholds, calibrated) of a hop kind ('pseudograd' too) at an inner step."""
        fits = [e for e in self.entries if e.kind == kind and e.step_from <= inner_step
                and (e.step_to is None or inner_step <= e.step_to)]
        if fits:
            return _as_tolerances(max(fits, key=_specificity)), True
        if self.context.builtin:
            return DEFAULT_TOLERANCES, True
        return GROSS_TOLERANCES, False


def stage_tolerances(entries: Iterable[AuditTolerance], context: AuditContext, stage: int) -> ToleranceTable:
    """The tolerance table of one stage of a miner replayed in `context`."""
    return ToleranceTable(context, stage, [e for e in entries if _matches(e, context, stage)])
