"""Step time and peak memory of each boundary setting against `boundary: none`, with repeats.

    python3 scripts/bench_boundary_overhead.py --out boundary_overhead.json          # one H100: < 3 min
    python3 scripts/bench_boundary_overhead.py --configs tiny --device cpu --repeats 1   # CPU smoke

Configs: `1b` (the 1b preset at the subnet bench's step, batch 8 x accum 2 x seq 1024) and
`standard` (the bench preset: d 1024, 8 blocks, 16 heads, seq 512, 4 stages, batch 32, the
standard config of docs/BENCHMARKS.md). Settings: `none` (uncompressed, no re-injection),
`none+tok` (uncompressed with token re-injection), `postnorm+tok` and `postnorm-fused+tok` (the
default boundary and its fused form; the one that is ModelConfig's default is marked). Every
repeat builds each setting afresh, in an order rotated by one per repeat, and runs W warm-up steps
(not timed) and N timed steps of the reference trainer's step (resbm.trainer, bf16 autocast on
CUDA); a run's step time is the median of its N per-step times (CUDA events), its memory the peak
allocated from the build on (weights, gradients, optimizer state, activations). Overhead =
setting / `none` of the same repeat, minus 1: the table gives its median over repeats and the
range; `spread` is (max - min) / median of a setting's own step times over the repeats.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resbm.config import DEFAULT_RESBM_VARIANT, ModelConfig  # noqa: E402
from resbm.device import pick_device  # noqa: E402
from scripts.bench_trainer_common import Run, device_banner, format_table, run_setting  # noqa: E402

__all__ = ["CONFIGS", "SETTINGS", "main", "summarise"]

CONFIGS: dict[str, tuple[str, int, int]] = {"1b": ("1b", 8, 2), "standard": ("bench", 32, 1), "tiny": ("tiny", 4, 2)}
"""name -> (preset, batch, accum)."""
SETTINGS: dict[str, dict[str, Any]] = {
    "none": dict(boundary="none", token_reinject=False),
    "none+tok": dict(boundary="none", token_reinject=True),
    "postnorm+tok": dict(boundary="resbm", boundary_variant="postnorm", token_reinject=True),
    "postnorm-fused+tok": dict(boundary="resbm", boundary_variant="postnorm-fused", token_reinject=True),
}
BASELINE = "none"


def _default_label() -> str:
    return f"{DEFAULT_RESBM_VARIANT}+tok"


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, setting): step-time medians and peaks per repeat, their spread, and the overhead
    against the baseline of the same repeat (median and range over repeats)."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for r in records:
        if "error" not in r:
            by.setdefault((r["bench_config"], r["setting"]), {})[r["repeat"]] = r
    out = []
    for (conf, setting), reps in sorted(by.items(), key=lambda kv: (kv[0][0], list(SETTINGS).index(kv[0][1]))):
        base = by.get((conf, BASELINE), {})
        times = [reps[i]["step_s_median"] for i in sorted(reps)]
        peaks = [reps[i]["peak_gib"] for i in sorted(reps) if reps[i].get("peak_gib") is not None]
        t_over = [reps[i]["step_s_median"] / base[i]["step_s_median"] - 1 for i in sorted(reps) if i in base]
        m_over = [reps[i]["peak_gib"] / base[i]["peak_gib"] - 1 for i in sorted(reps)
                  if i in base and reps[i].get("peak_gib") and base[i].get("peak_gib")]
        med = statistics.median(times)
        out.append({"config": conf, "setting": setting, "repeats": len(times), "step_s": times,
                    "step_s_median": med, "spread": (max(times) - min(times)) / med, "peak_gib": peaks,
                    "time_overhead": t_over, "memory_overhead": m_over})
    return out


def _pct_range(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{100 * statistics.median(xs):+.1f}% [{100 * min(xs):+.1f}, {100 * max(xs):+.1f}]"


def _row(s: dict[str, Any]) -> list[str]:
    label = s["setting"] + (" (default)" if s["setting"] == _default_label() else "")
    times = " / ".join(f"{1e3 * t:.1f}" for t in s["step_s"])
    peak = f"{max(s['peak_gib']):.2f}" if s["peak_gib"] else "-"
    return [s["config"], label, times, f"{100 * s['spread']:.1f}%", _pct_range(s["time_overhead"]), peak,
            _pct_range(s["memory_overhead"])]


HEADER = ["config", "setting", "step ms (each repeat)", "spread", "time vs none: median [range]", "peak GiB",
          "memory vs none: median [range]"]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every config x setting x repeat; print the table last; return the summary rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="1b,standard", help=f"comma-separated, of {sorted(CONFIGS)}")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every setting")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per run (3 on CUDA, 1 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (8 on CUDA, 2 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--budget-s", type=float, default=170.0, help="start no run after this many seconds")
    p.add_argument("--out", default=None, help="write every run and the summary as JSON here")
    args = p.parse_args(argv)
    confs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(confs) - set(CONFIGS))
    if unknown or not confs or args.repeats < 1:
        raise SystemExit(f"--configs must name some of {sorted(CONFIGS)} (got {unknown or confs}) and --repeats >= 1")
    dev = pick_device(args.device)
    cuda = dev.type == "cuda"
    warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    steps = (8 if cuda else 2) if args.steps is None else args.steps
    if not cuda:
        torch.set_num_threads(1)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    names = list(SETTINGS)
    for conf in confs:
        preset, batch, accum = CONFIGS[conf]
        print(device_banner(dev, ModelConfig.preset(preset)), flush=True)
        cache: dict = {}
        for rep in range(args.repeats):
            for setting in names[rep % len(names):] + names[:rep % len(names)]:
                cfg = ModelConfig.preset(preset, **SETTINGS[setting])
                if time.perf_counter() - t0 > args.budget_s:
                    rec = {"error": f"skipped: past the {args.budget_s:.0f} s budget"}
                else:
                    rec = run_setting(cfg, Run(f"{conf}/{setting}", batch, accum), dev, warmup=warmup,
                                      steps=steps, seed=args.seed, cache=cache, amp=cuda)
                rec.update(bench_config=conf, setting=setting, repeat=rep)
                records.append(rec)
                print(f"  {conf} {setting} repeat {rep + 1}: " + (rec.get("error") or
                      f"step {1e3 * rec['step_s_median']:.1f} ms" + (f", peak {rec['peak_gib']:.2f} GiB"
                                                                 if rec["peak_gib"] else "")), flush=True)
    summary = summarise(records)
    total = time.perf_counter() - t0
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(dev), "total_s": total, "warmup": warmup, "steps": steps,
                                              "summary": summary, "records": records}, indent=1) + "\n")
    print(f"done in {total:.0f} s: {args.repeats} repeat(s), {warmup} warm-up + {steps} timed steps per run; "
          f"batch x accum: " + ", ".join(f"{c} {CONFIGS[c][1]} x {CONFIGS[c][2]}" for c in confs))
    print(format_table(HEADER, [_row(s) for s in summary]))
    return summary


if __name__ == "__main__":
    main()
