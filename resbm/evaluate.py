"""Held-out evaluation of a language model: loss (nats per token), perplexity and bits per byte.

One implementation for every figure the project reports on held-out data: `resbm-eval`, the
validators' live validation loss, the localnet report and the reference trainer's curve. The
model is any function from token ids (B, T) to logits (B, T, V): the monolithic model, or the
stages run in sequence (`stages.pipeline_logits`).

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes the target tokens stand for, so
models with different tokenizers compare. A byte-level BPE token stands for exactly as many bytes
as its string has characters; a special token (end of text) for none.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["EvalResult", "evaluate_lm", "held_out_batches", "token_byte_lengths", "SPLIT_ALIASES"]

Batch = tuple[torch.Tensor, torch.Tensor]
SPLIT_ALIASES = {"validation": "val", "val": "val", "held-out": "val", "train": "train"}
"""Names a user may give a split, and the manifest's name for it."""


@dataclass(frozen=True)
class EvalResult:
    """Summed loss over `tokens` target tokens that stand for `bytes` bytes of text (None: unknown)."""

    nll_sum: float
    tokens: int
    bytes: int | None = None

    @property
    def loss(self) -> float:
        """Mean loss in nats per token."""
        return self.nll_sum / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        """exp(loss)."""
        return math.exp(self.loss) if self.loss < 700 else float("inf")

    @property
    def bits_per_byte(self) -> float | None:
        """Summed loss in bits over the bytes of text the targets stand for."""
        return self.nll_sum / math.log(2) / self.bytes if self.bytes else None

    def as_dict(self) -> dict:
        """Plain JSON-able figures."""
        return {"loss": self.loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "tokens": self.tokens, "bytes": self.bytes}


@torch.no_grad()
def evaluate_lm(logits_of: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch],
                token_bytes: np.ndarray | None = None, device: torch.device | str = "cpu",
                progress: Callable[[int], None] | None = None) -> EvalResult:
    """Cross-entropy of `logits_of(tokens)` against the targets of every batch, in float32 and
    summed in float64; `token_bytes[id]` (optional) gives the bytes each target stands for;
    `progress(n)` is told the tokens of each batch done."""
    nll, count, nbytes = 0.0, 0, 0
    for tokens, targets in batches:
        logits = logits_of(tokens.to(device))
        if logits.shape[:2] != targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
        flat = logits.float().reshape(-1, logits.shape[-1])
        nll += float(F.cross_entropy(flat, targets.to(flat.device).reshape(-1), reduction="sum").double())
        count += targets.numel()
        if token_bytes is not None:
            nbytes += int(token_bytes[targets.reshape(-1).numpy()].sum())
        if progress is not None:
            progress(targets.numel())
    if not math.isfinite(nll):
        raise ValueError("the model's loss is not finite (NaN or Inf weights or logits)")
    return EvalResult(nll, count, nbytes if token_bytes is not None else None)


def held_out_batches(dataset, tokens: int, seq_len: int, batch: int = 32) -> list[Batch]:
    """The fixed validation windows covering `tokens` target tokens (ceil(tokens / seq_len) windows of
    seq_len, evenly spaced over the split: resbm.dataset.Dataset.validation_batches), stacked `batch`
    windows per forward pass. The windows depend only on their count, so everyone with the same
    manifest and sizes evaluates the same tokens, however they batch them."""
    if tokens < 1 or batch < 1:
        raise ValueError(f"tokens and batch must be >= 1, got {tokens} and {batch}")
    rows = dataset.validation_batches(math.ceil(tokens / seq_len), 1, seq_len)
    return [(torch.cat([x for x, _ in rows[i:i + batch]]), torch.cat([y for _, y in rows[i:i + batch]]))
            for i in range(0, len(rows), batch)]


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte value, inverted (char -> byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_lengths(tokenizer_file: str | Path, vocab_size: int) -> np.ndarray:
    """Bytes of text each token id stands for (int64, length vocab_size); special tokens count 0."""
    from tokenizers import Tokenizer  # optional dependency; only bits per byte need it
    tok = Tokenizer.from_file(str(tokenizer_file))
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    decoder = (json.loads(tok.to_str()).get("decoder") or {}).get("type")
    alphabet = _byte_level_alphabet() if decoder == "ByteLevel" else None
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, tok.get_vocab_size())):
        if i in special:
            continue
        piece = tok.id_to_token(i)
        if piece is None:
            continue
        if alphabet is not None and all(c in alphabet for c in piece):
            out[i] = len(piece)
        else:
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out
