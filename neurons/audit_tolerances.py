"""Which numerics the validator replays a miner in, and which calibrated tolerances then apply.

A miner declares its device class and compute dtype at registration; the bridge stamps them on
every hop record. The validator replays in the same class when it has such a device (CPU always;
CUDA or MPS when it runs on one), else on its own device in float32, and judges each hop by the run
config's `audit_tolerances` entry for (miner numerics, replay numerics, stage, kind): the most
specific one wins (an exact stage over any stage, exact numerics over '*'). Hops no entry covers
use `neurons.audit.DEFAULT_TOLERANCES`, calibrated on tiny CPU models.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from protocol.audit_tolerances import AUDIT_KINDS, AuditTolerance

from .audit import DEFAULT_TOLERANCES, Tolerances

__all__ = ["numerics_key", "replay_numerics", "record_numerics", "stage_tolerances", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def numerics_key(device_class: str, compute_dtype: str) -> str:
    """'cuda/bfloat16' style key."""
    return f"{device_class}/{compute_dtype}"


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype of a declared compute dtype name (ValueError for an unknown one)."""
    if name not in _DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def record_numerics(records: Sequence) -> tuple[str, str]:
    """The (device class, dtype) a miner's hop records declare; ValueError when they disagree."""
    seen = {(getattr(r, "device_class", "cpu"), getattr(r, "compute_dtype", "float32")) for r in records}
    if len(seen) != 1:
        raise ValueError(f"hop records declare several numerics in one epoch: {sorted(seen)}")
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


def _specificity(e: AuditTolerance, miner: str, replay: str, stage: int, kind: str) -> int:
    if e.kind != kind or e.miner not in (miner, "*") or e.replay not in (replay, "*"):
        return -1
    if e.stage is not None and e.stage != stage:
        return -1
    return (e.stage is not None) * 4 + (e.miner != "*") * 2 + (e.replay != "*")


def _as_tolerances(e: AuditTolerance) -> Tolerances:
    if e.kind == "pseudograd":
        return Tolerances(pg_rel_err=e.rel_err, pg_min_cosine=e.min_cosine)
    return Tolerances(rel_err=e.rel_err, min_cosine=e.min_cosine, norm_ratio=e.norm_ratio,
                      loss_abs=e.loss_abs, loss_rel=e.loss_rel)


def stage_tolerances(entries: Iterable[AuditTolerance], miner: tuple[str, str], replay: tuple[str, str],
                     stage: int) -> dict[str, Tolerances]:
    """{hop kind (and 'pseudograd'): Tolerances} for one stage of a miner replayed in `replay`."""
    m = numerics_key(*miner)
    r = numerics_key(torch.device(replay[0]).type, replay[1])
    entries = list(entries)
    out: dict[str, Tolerances] = {}
    for kind in AUDIT_KINDS:
        best = max(entries, key=lambda e: _specificity(e, m, r, stage, kind), default=None)
        ok = best is not None and _specificity(best, m, r, stage, kind) >= 0
        out[kind] = _as_tolerances(best) if ok else DEFAULT_TOLERANCES
    return out
