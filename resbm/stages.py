"""Pipeline stages: the monolithic model cut at its boundaries, with the same parameter names.

Stage s holds the decoder of boundary s-1 (or the embedding, for s = 0), its blocks, and the
encoder of boundary s (or the final norm and head, for the last stage). Under token re-injection
(cfg.token_reinject) every stage s > 0 also takes the sample's tokens, which its decoder embeds;
they are public, so nothing extra crosses the wire. Parameter names are the model's own
(`blocks.{i}.*` with the global block index, `boundaries.{b}.encoder.*` ...), so state dicts
move between the model and its stages by key.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from spec.stage_shapes import stage_param_shapes

from .boundary import RMSNorm
from .boundary_kinds import build_boundary
from .config import ModelConfig
from .model import Block, block_has_mlp, init_weights, lm_loss, rotary_tables

__all__ = ["PipelineResult", "Stage", "build_stages", "merge_stage_states", "pipeline_logits", "pipeline_loss",
           "run_pipeline", "stage_param_names", "stage_param_shapes", "stage_state_dict"]


class Stage(nn.Module):
    """One pipeline stage: tokens or code in; code, logits or loss out."""

    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        if not 0 <= index < cfg.n_stages:
            raise ValueError(f"stage index must be in 0..{cfg.n_stages - 1}, got {index}")
        self.cfg, self.index = cfg, index
        self.is_first, self.is_last = index == 0, index == cfg.n_stages - 1
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model) if self.is_first else None
        sides: dict[str, nn.Module] = {}
        if not self.is_first:
            sides[str(index - 1)] = build_boundary(cfg, encoder=False, decoder=True)
        if not self.is_last:
            sides[str(index)] = build_boundary(cfg, encoder=True, decoder=False)
        self.boundaries = nn.ModuleDict(sides)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, block_has_mlp(cfg, i))
                                     for i in cfg.stage_layer_range(index)})
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if self.is_last else None
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) if self.is_last else None
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        have = {n: tuple(t.shape) for n, t in self.state_dict().items()}
        if list(have.items()) != list(stage_param_shapes(cfg, index).items()):
            raise RuntimeError(f"stage {index}'s parameters differ from spec.stage_shapes (which sizes "
                                 "the bridge's sync objects): update the table there with the module")

    @property
    def needs_tokens(self) -> bool:
        """True when forward needs `tokens` besides the code (a stage > 0 under token re-injection)."""
        return not self.is_first and self.cfg.token_reinject

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Stage 0 takes token ids (B, T); others the code (B, T, code_dim), plus the sample's token
        ids (B, T) when `needs_tokens` (stage 0 ignores `tokens`: x is the tokens). The last stage
        returns the mean loss when `targets` is given, else logits; the others the wire-exact code."""
        if self.is_first:
            if x.dtype != torch.int64 or x.dim() != 2:
                raise ValueError(f"stage 0 expects int64 token ids of shape (B, T), got {x.dtype} "
                                 f"{tuple(x.shape)}")
            x = self.embed(x)
        else:
            want = self.cfg.code_dim
            if x.dim() != 3 or x.shape[-1] != want or not x.is_floating_point():
                raise ValueError(f"stage {self.index} expects a float code of shape (B, T, {want}), "
                                 f"got {x.dtype} {tuple(x.shape)}")
            x = self.boundaries[str(self.index - 1)].decoder(x, tokens if self.needs_tokens else None)
        for block in self.blocks.values():
            x = block(x, self.rope_cos, self.rope_sin)
        if not self.is_last:
            return self.boundaries[str(self.index)].encoder(x)
        if targets is not None and targets.shape != x.shape[:2]:
            raise ValueError(f"targets shape {tuple(targets.shape)} does not match input "
                             f"{tuple(x.shape[:2])}")
        logits = self.head(self.norm(x))
        return logits if targets is None else lm_loss(logits, targets)


def build_stages(cfg: ModelConfig, seed: int = 0, stages: list[int] | None = None) -> list[Stage]:
    """Stages (all, or the listed indices) initialised exactly as build_model(cfg, seed) is."""
    out = []
    for s in range(cfg.n_stages) if stages is None else stages:
        stage = Stage(cfg, s)
        init_weights(stage, cfg, seed)
        out.append(stage)
    return out


def stage_param_names(cfg: ModelConfig, stage: int) -> list[str]:
    """State-dict keys of `stage`, in order (from `spec.stage_shapes`: no model is built)."""
    return list(stage_param_shapes(cfg, stage))


def stage_state_dict(model_state: dict[str, torch.Tensor], cfg: ModelConfig, stage: int
                     ) -> dict[str, torch.Tensor]:
    """The entries of a full model state dict that belong to `stage`."""
    names = stage_param_names(cfg, stage)
    missing = [n for n in names if n not in model_state]
    if missing:
        raise KeyError(f"model state lacks {len(missing)} key(s) of stage {stage}, e.g. {missing[:3]}")
    return {n: model_state[n] for n in names}


def merge_stage_states(states: list[dict[str, torch.Tensor]], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of stage_state_dict: one state per stage, in stage order -> full model state."""
    if len(states) != cfg.n_stages:
        raise ValueError(f"expected {cfg.n_stages} stage states, got {len(states)}")
    merged: dict[str, torch.Tensor] = {}
    for s, state in enumerate(states):
        want = stage_param_names(cfg, s)
        if sorted(state) != sorted(want):
            extra, lack = sorted(set(state) - set(want)), sorted(set(want) - set(state))
            raise KeyError(f"stage {s} state has unexpected keys {extra[:3]} / lacks {lack[:3]}")
        dup = [n for n in state if n in merged]
        if dup:
            raise KeyError(f"keys {dup[:3]} appear in more than one stage")
        merged.update(state)
    return merged


@torch.no_grad()
def pipeline_logits(stages: list[Stage], tokens: torch.Tensor,
                    wire: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Logits (B, T, V) of the stages run in sequence; `wire(code)` (optional) is what each code
    becomes on its way to the next stage (say, a codec encode + decode)."""
    x = tokens
    for stage in stages[:-1]:
        x = stage(x, tokens=tokens)
        if wire is not None:
            x = wire(x)
    return stages[-1](x, tokens=tokens)


@dataclass
class PipelineResult:
    """Loss of one micro-batch, plus the codes sent forward and gradients sent back per boundary."""

    loss: float
    codes: list[torch.Tensor] = field(default_factory=list)
    code_grads: list[torch.Tensor] = field(default_factory=list)


def _forward_backward(stages: list[Stage], tokens: torch.Tensor, targets: torch.Tensor, backward: bool,
                      amp: torch.dtype | None) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(loss, codes sent forward, code gradients sent back); forwards under autocast(amp) when given,
    backwards outside it (as a miner runs them)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    x = tokens
    with torch.autocast(tokens.device.type, dtype=amp) if amp is not None else contextlib.nullcontext():
        for stage in stages[:-1]:
            out = stage(x, tokens=tokens)
            outputs.append(out)
            x = out.detach().requires_grad_(backward)
            inputs.append(x)
        loss = stages[-1](x, targets, tokens=tokens)
    if not backward:
        return loss.detach(), outputs, []
    loss.backward()
    grads: list[torch.Tensor] = [torch.empty(0)] * len(outputs)
    for b in reversed(range(len(outputs))):
        grads[b] = inputs[b].grad
        outputs[b].backward(grads[b])
    return loss.detach(), outputs, grads


def run_pipeline(stages: list[Stage], tokens: torch.Tensor, targets: torch.Tensor,
                 backward: bool = True) -> PipelineResult:
    """Run the stages in sequence as the network would: each stage gets a detached copy of the
    code (and the tokens, for re-injection); backward goes last to first, passing each boundary's
    input gradient (accumulating .grad)."""
    loss, outputs, grads = _forward_backward(stages, tokens, targets, backward, None)
    return PipelineResult(loss=float(loss), codes=[o.detach() for o in outputs], code_grads=grads)


def pipeline_loss(stages: list[Stage], tokens: torch.Tensor, targets: torch.Tensor,
                  amp: torch.dtype | None = None) -> torch.Tensor:
    """run_pipeline's forward and backward of one micro-batch (forwards under autocast to `amp` when
    given), returning the detached loss as a tensor: nothing is read back, so no device sync."""
    return _forward_backward(stages, tokens, targets, True, amp)[0]
