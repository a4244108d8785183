"""Inner optimizers: Muon for hidden matrices, AdamW for the rest, one warmup + cosine schedule.

Muon is `resbm.muon.BatchedMuon` (torch.optim.Muon's update, Newton-Schulz batched per shape);
`muon_impl="torch"` builds torch.optim.Muon itself (the same function, one matrix at a time).
AdamW runs torch's fused kernel when every parameter is on a CUDA device. Neither reads a value
back to the host, so a step is queued without a device sync.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, asdict
from typing import Any

import torch
from torch import nn

from .muon import BatchedMuon

__all__ = ["InnerOptimizer", "OptimConfig", "build_optimizer", "lr_multiplier", "split_params"]

log = logging.getLogger(__name__)

OPTIMIZER_KINDS = ("muon", "adamw")
MUON_IMPLS = ("batched", "torch")
_ADAMW_ONLY_MODULES = frozenset({"embed", "head"})


@dataclass
class OptimConfig:
    """Inner optimizer settings; every lr follows lr_multiplier(step) of the schedule below."""

    kind: str = "muon"
    """'muon' (Muon for hidden matrices, AdamW for the rest) or 'adamw' (AdamW for everything)."""
    muon_lr: float = 0.02
    """Muon peak lr, set explicitly (torch's default 1e-3 is far too small for Muon); > 0."""
    muon_momentum: float = 0.95
    """Muon momentum (Nesterov), in [0, 1)."""
    adamw_lr: float = 3e-3
    """AdamW peak lr (embeddings, head, norm gains; everything when kind='adamw'); > 0."""
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas, each in [0, 1)."""
    weight_decay: float = 0.01
    """Decoupled weight decay on matrices and embeddings (never on norm gains); >= 0."""
    warmup_steps: int = 10
    """Linear warmup steps (>= 0): lr rises to peak over steps 0..warmup_steps-1."""
    total_steps: int = 1000
    """Schedule length (>= 1): cosine decay from peak to min_lr_ratio * peak at this step."""
    min_lr_ratio: float = 0.1
    """Final lr as a fraction of peak, in [0, 1]."""

    def __post_init__(self) -> None:
        self.adamw_betas = tuple(float(b) for b in self.adamw_betas)  # type: ignore[assignment]
        if self.kind not in OPTIMIZER_KINDS:
            raise ValueError(f"kind must be one of {list(OPTIMIZER_KINDS)}, got {self.kind!r}")
        for name in ("muon_lr", "adamw_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if len(self.adamw_betas) != 2 or not all(0 <= b < 1 for b in self.adamw_betas):
            raise ValueError(f"adamw_betas must be two numbers in [0, 1), got {self.adamw_betas}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got "
                             f"{self.warmup_steps}, {self.total_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        out = asdict(self)
        out["adamw_betas"] = list(self.adamw_betas)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimConfig":
        """Inverse of to_dict; unknown keys are rejected by name."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OptimConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)


def lr_multiplier(ocfg: OptimConfig, step: int) -> float:
    """Schedule factor for `step`: linear warmup to 1, then cosine to min_lr_ratio at total_steps."""
    if step < ocfg.warmup_steps:
        return (step + 1) / ocfg.warmup_steps
    span = max(1, ocfg.total_steps - ocfg.warmup_steps)
    progress = min(1.0, (step - ocfg.warmup_steps) / span)
    return ocfg.min_lr_ratio + (1 - ocfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def split_params(module: nn.Module) -> tuple[list[str], list[str]]:
    """(muon_names, adamw_names): every 2-D hidden matrix (attention, MLP, boundary E and D) goes to
    Muon; embeddings, the output head and norm gains go to AdamW. Each trainable name is in exactly one.
    Works on a model, a stage or a container of stages (an `embed` or `head` name component marks AdamW)."""
    muon, adamw = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and _ADAMW_ONLY_MODULES.isdisjoint(name.split(".")):
            muon.append(name)
        else:
            adamw.append(name)
    return muon, adamw


class InnerOptimizer:
    """Muon + AdamW (or AdamW alone) stepped together on one lr schedule. `muon_impl` picks the Muon
    implementation ('batched' or 'torch'); `fused_adamw` None means fused exactly when every
    parameter is on CUDA (set it after moving the module to its device)."""

    def __init__(self, module: nn.Module, ocfg: OptimConfig, muon_impl: str = "batched",
                 fused_adamw: bool | None = None) -> None:
        if muon_impl not in MUON_IMPLS:
            raise ValueError(f"muon_impl must be one of {list(MUON_IMPLS)}, got {muon_impl!r}")
        self.ocfg = ocfg
        params = dict(module.named_parameters())
        muon_names, adamw_names = split_params(module)
        if ocfg.kind == "adamw":
            muon_names, adamw_names = [], muon_names + adamw_names
        wd = ocfg.weight_decay
        decay = [n for n in adamw_names if params[n].ndim >= 2]
        no_decay = [n for n in adamw_names if params[n].ndim < 2]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._base_lr: dict[str, list[float]] = {}
        if muon_names:
            muon_cls = BatchedMuon if muon_impl == "batched" else torch.optim.Muon
            self.optimizers["muon"] = muon_cls(
                [params[n] for n in muon_names], lr=ocfg.muon_lr, weight_decay=wd,
                momentum=ocfg.muon_momentum, nesterov=True, adjust_lr_fn="original")
            self._base_lr["muon"] = [ocfg.muon_lr]
        groups = [{"params": [params[n] for n in decay], "weight_decay": wd},
                  {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        if fused_adamw is None:
            fused_adamw = bool(adamw_names) and all(params[n].is_cuda for n in adamw_names)
        self._adamw_flags = {"fused": True} if fused_adamw else {"fused": None}
        if groups:
            self.optimizers["adamw"] = torch.optim.AdamW(groups, lr=ocfg.adamw_lr, betas=ocfg.adamw_betas,
                                                         **self._adamw_flags)
            self._base_lr["adamw"] = [ocfg.adamw_lr] * len(groups)
        self.param_names = {"muon": muon_names, "adamw": decay + no_decay}
        log.debug("optimizer %s: %d Muon tensors, %d AdamW tensors", ocfg.kind, len(muon_names),
                  len(decay) + len(no_decay))

    def zero_grad(self) -> None:
        """Clear every gradient (set to None)."""
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def set_lr(self, global_step: int) -> float:
        """Set every group's lr for `global_step`; returns the schedule multiplier."""
        mult = lr_multiplier(self.ocfg, global_step)
        for key, opt in self.optimizers.items():
            for group, base in zip(opt.param_groups, self._base_lr[key]):
                group["lr"] = base * mult
        return mult

    def step(self, global_step: int) -> None:
        """Set the scheduled lr for `global_step`, then step Muon and AdamW."""
        self.set_lr(global_step)
        for opt in self.optimizers.values():
            opt.step()

    def step_part(self, part: str) -> None:
        """Step one part ('muon' or 'adamw', if present) at the lr set_lr last set (for timing each)."""
        if part in self.optimizers:
            self.optimizers[part].step()

    def state_dict(self) -> dict[str, Any]:
        """{'muon': ..., 'adamw': ...} torch optimizer state dicts (see checkpoint.py to store them)."""
        return {key: opt.state_dict() for key, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict(); the parameter grouping must be the same."""
        if sorted(state) != sorted(self.optimizers):
            raise ValueError(f"optimizer state has parts {sorted(state)}, expected {sorted(self.optimizers)}")
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state[key])
        adamw = self.optimizers.get("adamw")
        if adamw is not None:  # the kernel choice is this process's, not the saver's
            for group in adamw.param_groups:
                group.update(self._adamw_flags)
            if self._adamw_flags["fused"]:  # the fused kernel keeps its step counts on the device
                for p, st in adamw.state.items():
                    if isinstance(st.get("step"), torch.Tensor):
                        st["step"] = st["step"].to(p.device, torch.float32)


def build_optimizer(module: nn.Module, ocfg: OptimConfig, muon_impl: str = "batched",
                    fused_adamw: bool | None = None) -> InnerOptimizer:
    """The inner optimizer of a model or stage for the given settings (see InnerOptimizer)."""
    return InnerOptimizer(module, ocfg, muon_impl=muon_impl, fused_adamw=fused_adamw)
