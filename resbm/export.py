"""An exported model: one folder that loads without the subnet (no network I/O here).

    model.safetensors  the monolithic model's weights, fp32, under resbm.model.ResBM's names
    config.json        the ModelConfig (`ModelConfig.from_dict(json.load(...))`)
    tokenizer.json     the tokenizer of the run's dataset
    export.json        where the weights came from: run, round, per-stage hashes, tokens, losses
    README.md          the model card: export.json in words

`stitch` turns the stages' states into the monolithic state dict (their parameter names are the
model's, resbm.stages). `write_export` writes the folder under a temporary name next to the
target and renames it into place, so a crash never leaves a half-written export; it refuses a
non-empty target unless told to replace it. `load_export` reads safetensors and JSON only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .model import ResBM
from .model_card import model_card
from .stages import merge_stage_states

__all__ = ["FORMAT", "FILES", "ExportError", "Exported", "check_target", "model_shapes", "stitch", "write_export",
           "load_export"]

FORMAT = "resbm-export/1"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "export.json", "README.md")


class ExportError(ValueError):
    """An export that cannot be written or read: the message says what and what to do."""


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry of the monolithic model and its shape (meta device: no memory)."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in ResBM(cfg).state_dict().items()}


def stitch(thetas: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The monolithic model's state dict from each stage's weights, in stage order (pure)."""
    try:
        state = merge_stage_states(thetas, cfg)
    except (KeyError, ValueError) as exc:
        raise ExportError(f"the stage states do not make up the model: {exc}") from None
    want = model_shapes(cfg)
    if set(state) != set(want):
        raise ExportError(f"stitched names differ from the model's: {sorted(set(state) ^ set(want))[:5]}")
    for n, shape in want.items():
        if tuple(state[n].shape) != shape:
            raise ExportError(f"{n} has shape {tuple(state[n].shape)}, the model needs {shape}")
    return {n: state[n].detach().to("cpu", torch.float32).contiguous() for n in sorted(state)}


def check_target(out: Path, force: bool) -> None:
    """ExportError unless `out` is absent, an empty folder, or (with `force`) a folder to replace."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} is not empty; choose a new folder or pass --force to replace it")


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def write_export(out: str | os.PathLike[str], state: dict[str, torch.Tensor], cfg: ModelConfig,
                 tokenizer_file: str | os.PathLike[str], info: dict[str, Any], force: bool = False) -> Path:
    """Write the export folder at `out` in one rename; `info` becomes export.json and the card."""
    out = Path(out).resolve()
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # one key: the same bytes every time
        _write_json(tmp / "config.json", cfg.to_dict())
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        doc = {"format": FORMAT, **info}
        _write_json(tmp / "export.json", doc)
        (tmp / "README.md").write_text(model_card(doc, cfg), encoding="utf-8")
        for name in FILES:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        check_target(out, force)  # nothing appeared meanwhile
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


@dataclass
class Exported:
    """A loaded export: the model (eval mode), its config, export.json, and the tokenizer file."""

    model: ResBM
    config: ModelConfig
    info: dict[str, Any]
    tokenizer_file: Path


def load_export(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> Exported:
    """Read an export folder (safetensors and JSON only) into a ready model on `device`."""
    root = Path(folder)
    missing = [n for n in FILES if not (root / n).is_file()]
    if missing:
        raise ExportError(f"{root} is not a model export (missing {', '.join(missing)}); "
                          "make one with resbm-export")
    try:
        info = json.loads((root / "export.json").read_text(encoding="utf-8"))
        cfg = ModelConfig.from_dict(json.loads((root / "config.json").read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ExportError(f"{root}: unreadable config.json or export.json ({exc})") from None
    if info.get("format") != FORMAT:
        raise ExportError(f"{root}/export.json has format {info.get('format')!r}; this version reads {FORMAT!r}")
    try:
        state = load_file(str(root / "model.safetensors"))
    except Exception as exc:  # safetensors raises its own error types
        raise ExportError(f"{root}/model.safetensors does not load: {exc}") from None
    model = ResBM(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{root}/model.safetensors does not match config.json: {str(exc)[:300]}") from None
    return Exported(model.to(device).eval(), cfg, info, root / "tokenizer.json")
