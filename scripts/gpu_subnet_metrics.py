"""Pure arithmetic of the GPU subnet benchmark: per-stage FLOPs and MFU, merge time per round from
sampled bridge phases, audit counts from a validator log, and the validator's lag."""
from __future__ import annotations

import re

from resbm.config import ModelConfig

__all__ = ["stage_flops_per_token", "mfu", "merge_seconds_per_round", "audit_counts", "validator_lag"]

_AUDIT = re.compile(r"audit of \S+ round \d+: (PASS|FAIL)")
_INCOMPLETE = re.compile(r"audit of \S+ round \d+ incomplete")


def stage_flops_per_token(cfg: ModelConfig, stage: int) -> float:
    """Training FLOPs (fwd + bwd) per token of one stage, the same nanoGPT rule as
    ModelConfig.flops_per_token: 6 x matmul weights + 12 L d T for attention."""
    d, h, k = cfg.d_model, cfg.mlp_hidden, cfg.bottleneck_width
    layers = len(cfg.stage_layer_range(stage))
    weights = layers * (4 * d * d + 3 * d * h)
    if stage == cfg.n_stages - 1:
        weights += cfg.vocab_size * d  # the head
    if cfg.boundary in ("naive", "resbm"):
        weights += d * k * ((stage < cfg.n_stages - 1) + (stage > 0))  # encoder out, decoder in
    return 6 * weights + 12 * layers * d * cfg.seq_len


def mfu(flops_per_token: float, tokens: float, seconds: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation over `seconds`; None without a known peak or time."""
    if not peak_flops or seconds <= 0:
        return None
    return flops_per_token * tokens / seconds / peak_flops


def merge_seconds_per_round(samples: list[tuple[float, int, str]]) -> dict[int, float]:
    """Seconds each round spent in the bridge's 'merge' phase, from (time, round, phase) samples
    taken in order; a merge still open at the last sample counts up to that sample."""
    out: dict[int, float] = {}
    for (t0, rnd, phase), (t1, _, _) in zip(samples, samples[1:]):
        if phase == "merge":
            out[rnd] = out.get(rnd, 0.0) + (t1 - t0)
    return out


def audit_counts(validator_log: str) -> dict[str, int]:
    """Audits run / passed / failed / incomplete, read from the validator's log lines."""
    verdicts = _AUDIT.findall(validator_log)
    passed = verdicts.count("PASS")
    return {"run": len(verdicts), "passed": passed, "failed": len(verdicts) - passed,
            "incomplete": len(_INCOMPLETE.findall(validator_log))}


def validator_lag(bridge_round: int, phase: str, validator_next_round: int) -> int:
    """Closed rounds the validator has not processed yet (0 = caught up)."""
    closed = bridge_round + 1 if phase == "done" else bridge_round
    return max(0, closed - validator_next_round)
