"""The README.md model card of an export: what export.json records, in words."""
from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig
from .model import ResBM

__all__ = ["boundary_summary", "model_card"]


def boundary_summary(cfg: ModelConfig, batch_size: int = 1) -> dict[str, Any]:
    """The stage boundary and what it saves on the wire, per token and boundary, one way (the
    code's header amortised over one micro-batch of `batch_size` sequences)."""
    wire = cfg.wire_bytes_per_token(batch_size=batch_size, direction="fwd")
    raw = cfg.d_model * 2  # the residual in bf16
    return {"kind": cfg.boundary, "variant": cfg.boundary_variant, "boundaries": cfg.n_stages - 1,
            "d_model": cfg.d_model, "code_dim": cfg.code_dim,
            "width_ratio": cfg.d_model / cfg.code_dim, "wire_codec": cfg.wire_codec,
            "wire_bytes_per_token": wire, "bf16_bytes_per_token": raw, "wire_ratio": raw / wire}


def _num(x: Any, fmt: str = ",") -> str:
    return "not recorded" if x is None else format(x, fmt)


def _loss_lines(info: dict[str, Any]) -> list[str]:
    out = []
    v = info.get("validation")
    if v:
        out.append(f"- validation loss (validators, median of {v['validators']} report(s) on "
                   f"{v['tokens']:,} held-out tokens of the run's dataset): **{v['loss']:.4f}** nats/token")
    else:
        out.append("- validation loss (validators): none reported for this round")
    m = info.get("measured")
    if m:
        bpb = "n/a" if m.get("bits_per_byte") is None else f"{m['bits_per_byte']:.4f}"
        out.append(f"- validation loss measured at export ({m['tokens']:,} tokens of the `{m['split']}` split): "
                   f"{m['loss']:.4f} nats/token, perplexity {m['perplexity']:.2f}, {bpb} bits/byte")
    if info.get("training_loss") is not None:
        out.append(f"- training loss (mean of the round's last-stage hops): {info['training_loss']:.4f}")
    return out


def model_card(info: dict[str, Any], cfg: ModelConfig) -> str:
    """Markdown describing the export: provenance, size, boundary, losses, how to use it."""
    b = boundary_summary(cfg, info.get("batch_size") or 1)
    d, h, L, V = cfg.d_model, cfg.mlp_hidden, cfg.n_layers, cfg.vocab_size
    with torch.device("meta"):
        n_params = sum(p.numel() for p in ResBM(cfg).parameters())
    lines = [
        f"# ResBM model: run `{info['run_id']}`, after round {info['round']}",
        "",
        f"Trained by a ResBM pipeline-parallel subnet and exported with `resbm-export` from {info.get('source', '?')} "
        f"on {info.get('exported_at', '?')}.",
        "",
        "## Training",
        "",
        f"- run `{info['run_id']}`, sync mode `{info.get('sync_mode', '?')}`: the merged weights after round "
        f"{info['round']} ({info['round'] + 1} of {info.get('total_rounds', '?')} rounds)",
        f"- tokens trained: {_num(info.get('tokens_trained'))} ({_num(info.get('samples_trained'))} samples "
        f"completed x {info.get('batch_size', '?')} sequences x {cfg.seq_len} tokens)",
        *_loss_lines(info),
        "",
        "## Architecture",
        "",
        f"- {L} blocks, d_model {d}, {cfg.n_heads} heads, SwiGLU {h}, vocabulary {V}, context {cfg.seq_len} tokens; "
        f"{n_params:,} parameters in all",
        f"- {cfg.n_stages} pipeline stages; boundary `{b['kind']}` / `{b['variant']}` at each of the "
        f"{b['boundaries']} stage boundaries: the d = {d} residual crosses as a k = {b['code_dim']} code "
        f"({b['width_ratio']:g}x narrower), {b['wire_bytes_per_token']:.1f} bytes per token one way in "
        f"`{b['wire_codec']}` vs {b['bf16_bytes_per_token']} uncompressed in bf16 ({b['wire_ratio']:.1f}x less)",
        f"- token re-injection: {'on' if cfg.token_reinject else 'off'}",
        "",
        "## Verified provenance",
        "",
        "Every stage's published state was checked against the sha256 its replicas voted for:",
        "",
        "| stage | sha256 | checkpoint round | decided updates applied |",
        "|---|---|---|---|",
        *[f"| {s['stage']} | `{s['sha256'] or 'init (from init_seed)'}` | {s.get('checkpoint_round', '-')} | "
          f"{s.get('updates', 0)} |" for s in info.get("stages", [])],
        "",
        "## Use",
        "",
        "```bash",
        "resbm-generate --model THIS_FOLDER --prompt \"Once upon a time\"",
        "resbm-eval --model THIS_FOLDER --dataset path/to/manifest.json --split validation",
        "```",
        "",
        "In Python: `resbm.export.load_export(folder).model(tokens)` gives logits; the weights are plain "
        "safetensors under `resbm.model.ResBM`'s parameter names, `config.json` is its `ModelConfig`.",
        "",
    ]
    if info.get("dataset"):
        lines[-1:-1] = [f"The run's dataset: `{info['dataset']['manifest']}` (manifest sha256 "
                        f"`{info['dataset']['sha256']}`).", ""]
    return "\n".join(lines)
