"""Checkpoints without pickle: tensors in safetensors files, scalars and config in a JSON sidecar.

A checkpoint is a directory::

    model.safetensors   model or stage state dict
    optim.safetensors   optimizer tensors (momentum buffers, Adam moments, step counters)
    meta.json           format, model config, step, optimizer scalars and param groups, extra

meta.json is written last, so a directory without it is an interrupted save and is rejected.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import ModelConfig

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

FORMAT = "resbm-checkpoint/1"
_META_MAX_BYTES = 16 << 20


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match what loads it."""


@dataclass
class Checkpoint:
    """What load_checkpoint read."""

    state: dict[str, torch.Tensor]
    config: ModelConfig
    step: int
    extra: dict[str, Any] = field(default_factory=dict)


def _flatten_optimizer(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """{'muon': sd, 'adamw': sd} -> (tensors keyed 'part.idx.key', JSON-able remainder)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for part, sd in opt_state.items():
        states: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            states[str(idx)] = {}
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{part}.{idx}.{key}"] = value.detach().cpu().contiguous()
                    states[str(idx)][key] = {"tensor": f"{part}.{idx}.{key}"}
                else:
                    states[str(idx)][key] = {"value": value}
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
        scalars[part] = {"state": states, "param_groups": groups}
    return tensors, scalars


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part, blob in scalars.items():
        state: dict[int, dict[str, Any]] = {}
        for idx, st in blob["state"].items():
            state[int(idx)] = {}
            for key, ref in st.items():
                if "tensor" in ref:
                    if ref["tensor"] not in tensors:
                        raise CheckpointError(f"optimizer tensor {ref['tensor']!r} missing from optim.safetensors")
                    state[int(idx)][key] = tensors[ref["tensor"]]
                else:
                    state[int(idx)][key] = ref["value"]
        groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
                  for g in blob["param_groups"]]
        out[part] = {"state": state, "param_groups": groups}
    return out


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, torch.Tensor], config: ModelConfig,
                    step: int, optimizer: Any | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory; `optimizer` is anything with state_dict() (e.g. InnerOptimizer)."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "meta.json"
    if meta_path.exists():
        meta_path.unlink()  # mark incomplete while files are replaced
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(root / "model.safetensors"))
    opt_scalars = None
    if optimizer is not None:
        tensors, opt_scalars = _flatten_optimizer(optimizer.state_dict())
        save_file(tensors, str(root / "optim.safetensors"))
    meta = {"format": FORMAT, "config": config.to_dict(), "step": int(step), "optimizer": opt_scalars,
            "extra": extra or {}}
    tmp = root / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, meta_path)
    log.info("saved checkpoint step %d to %s", step, root)
    return root


def load_checkpoint(path: str | os.PathLike[str], module: nn.Module | None = None,
                    optimizer: Any | None = None, expect_config: ModelConfig | None = None) -> Checkpoint:
    """Read a checkpoint; optionally load it into `module` (strict) and `optimizer`, and check that its
    config equals `expect_config`."""
    root = Path(path)
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{root} has no meta.json: not a checkpoint, or an interrupted save")
    if meta_path.stat().st_size > _META_MAX_BYTES:
        raise CheckpointError(f"{meta_path} is larger than {_META_MAX_BYTES} bytes")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    config = ModelConfig.from_dict(meta["config"])
    if expect_config is not None and config != expect_config:
        raise CheckpointError(f"checkpoint config {config} differs from the expected {expect_config}")
    state = load_file(str(root / "model.safetensors"))
    if module is not None:
        module.load_state_dict(state, strict=True)
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise CheckpointError(f"{root} holds no optimizer state")
        tensors = load_file(str(root / "optim.safetensors"))
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    return Checkpoint(state=state, config=config, step=int(meta["step"]), extra=meta.get("extra", {}))
