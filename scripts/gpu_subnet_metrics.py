"""Pure arithmetic of the GPU subnet benchmark: per-stage FLOPs and MFU, merge time per round from
sampled bridge phases, audit counts from a validator log, the validator's lag, and each miner's
wall-time breakdown (its TimeBook) with the bridge's seal time."""
from __future__ import annotations

import re

from neurons.timebook import BACKGROUND_ACTIVITIES, MAIN_ACTIVITIES, hop_wall_ratio
from resbm.config import ModelConfig

__all__ = ["stage_flops_per_token", "mfu", "merge_seconds_per_round", "round_shares", "audit_counts", "validator_lag",
           "seal_seconds", "time_breakdown", "BREAKDOWN_COLUMNS"]

# The per-miner table's columns: main-loop activities (they sum to wall), then background work.
BREAKDOWN_COLUMNS = (*MAIN_ACTIVITIES, "other", *BACKGROUND_ACTIVITIES)
_SEAL = re.compile(r'^resbm_bridge_seal_seconds_(sum|count)\{stage="(\d+)"\} (\S+)$', re.M)

_AUDIT = re.compile(r"audit of \S+ round \d+: (PASS|FAIL)[^\n]*?\((\d+(?:\.\d+)?)s\)$", re.M)
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


def round_shares(samples: list[tuple[float, int, str]]) -> dict[int, dict[str, float]]:
    """Per round seen from its start to its end: seconds in 'train' and in 'merge' (the sync) and
    the sync's share of the round; rounds still open at the last sample are left out."""
    spans: dict[int, dict[str, float]] = {}
    for (t0, rnd, phase), (t1, nxt, _) in zip(samples, samples[1:]):
        if phase in ("train", "merge"):
            row = spans.setdefault(rnd, {"train": 0.0, "merge": 0.0, "closed": False})
            row[phase] += t1 - t0
        if nxt != rnd and rnd in spans:
            spans[rnd]["closed"] = True
    out = {}
    for rnd, row in spans.items():
        total = row["train"] + row["merge"]
        if row["closed"] and total > 0:
            out[rnd] = {"train": row["train"], "merge": row["merge"], "sync_share": row["merge"] / total}
    return out


def merge_seconds_per_round(samples: list[tuple[float, int, str]]) -> dict[int, float]:
    """Seconds each round spent in the bridge's 'merge' phase, from (time, round, phase) samples
    taken in order; a merge still open at the last sample counts up to that sample."""
    out: dict[int, float] = {}
    for (t0, rnd, phase), (t1, _, _) in zip(samples, samples[1:]):
        if phase == "merge":
            out[rnd] = out.get(rnd, 0.0) + (t1 - t0)
    return out


def audit_counts(validator_log: str) -> dict:
    """Audits run / passed / failed / incomplete, and the seconds their replays took, read from
    the validator's log lines."""
    verdicts = _AUDIT.findall(validator_log)
    passed = sum(1 for v, _ in verdicts if v == "PASS")
    return {"run": len(verdicts), "passed": passed, "failed": len(verdicts) - passed,
            "incomplete": len(_INCOMPLETE.findall(validator_log)),
            "seconds": round(sum(float(s) for _, s in verdicts), 2)}


def validator_lag(bridge_round: int, phase: str, validator_next_round: int) -> int:
    """Closed rounds the validator has not processed yet (0 = caught up)."""
    closed = bridge_round + 1 if phase == "done" else bridge_round
    return max(0, closed - validator_next_round)


def seal_seconds(prometheus_text: str) -> dict[int, tuple[float, int]]:
    """{stage: (seconds, seals)} from the bridge's /metrics text (its seal histogram)."""
    out: dict[int, list] = {}
    for part, stage, value in _SEAL.findall(prometheus_text):
        row = out.setdefault(int(stage), [0.0, 0])
        row[0 if part == "sum" else 1] = float(value) if part == "sum" else int(float(value))
    return {k: (v[0], v[1]) for k, v in out.items()}


def time_breakdown(status: dict, seal: tuple[float, int] | None = None) -> dict:
    """One miner's row: seconds per activity (main loop, then background), hops, the bridge's seal
    seconds for its stage, and two ratios: a hop's in-round wall time over its compute, and its own
    path (lease, download, compute, waiting on its uploads) over its compute."""
    book = status.get("time") or {"wall": 0.0, "main": {}, "background": {}}
    main, bg = book["main"], book["background"]
    row = {a: main.get(a, 0.0) for a in (*MAIN_ACTIVITIES, "other")}
    row.update({a: bg.get(a, 0.0) for a in BACKGROUND_ACTIVITIES})
    compute = main.get("compute", 0.0)
    own = sum(main.get(a, 0.0) for a in ("lease", "download", "compute", "drain"))
    row.update(wall=book["wall"], hops=status.get("hops_computed", status.get("hops_done", 0)),
               hop_wall_ratio=hop_wall_ratio(main), own_path_ratio=own / compute if compute > 0 else None,
               seal=seal[0] if seal else None, seals=seal[1] if seal else 0)
    return row
