"""Tables and plots of `scripts/bench_compression.py` results: load the per-run JSON records,
summarise them against the same-optimizer and AdamW baselines, format the table, plot the curves.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["load_results", "summarise", "format_table", "plot_curves", "fmt"]


def load_results(paths: list[str]) -> list[dict[str, Any]]:
    """Every result record in the given JSON files or folders (folders: *.json inside)."""
    out = []
    for p in map(Path, paths):
        for f in sorted(p.glob("*.json")) if p.is_dir() else [p]:
            rec = json.loads(f.read_text())
            if not isinstance(rec, dict) or "name" not in rec or "final_val" not in rec:
                raise ValueError(f"{f}: not a bench_compression result (needs 'name' and 'final_val')")
            out.append(rec)
    return out


def _key(rec: dict[str, Any]) -> tuple:
    s = rec["setting"]
    return (rec["d_model"], s["opt"], s["boundary"] != "none", s["boundary"], -rec["ratio"], s["codec"],
            s.get("token_reinject", False), s["seed"], s.get("tag", ""), s.get("dec_mod", ""),
            s.get("enc_lr", 1.0), s.get("dec_lr", 1.0), s.get("e_init", 1.0), s.get("d_init", 0.0))


def summarise(results: list[dict[str, Any]], timing: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Rows with gaps vs the same-optimizer and the AdamW baseline (seed 0, same d and steps) and
    step time / peak memory relative to the baseline; isolated `timing` records override step times."""
    timed: dict[tuple, dict[str, Any]] = {}
    for r in timing or []:  # several isolated repeats: keep the fastest (least disturbed) one
        key = (r["name"], r["d_model"])
        if key not in timed or r["step_ms"] < timed[key]["step_ms"]:
            timed[key] = r
    blank = {"step_ms": None, "peak_mem": None}
    base = {(r["setting"]["opt"], r["d_model"], r["steps"]): r for r in results
            if r["setting"]["boundary"] == "none" and r["setting"]["seed"] == 0 and not r["setting"].get("tag")
            and not r["setting"].get("token_reinject")}
    rows = []
    for r in sorted(results, key=_key):
        same = base.get((r["setting"]["opt"], r["d_model"], r["steps"]))
        adamw = base.get(("adamw", r["d_model"], r["steps"]))
        fallback = lambda rec: blank if timing else rec  # noqa: E731  (concurrent runs: times not comparable)
        t, tb = timed.get((r["name"], r["d_model"]), fallback(r)), None
        if same is not None:
            tb = timed.get((same["name"], same["d_model"]), fallback(same))
        rel = lambda a, b: (a / b - 1) * 100 if a is not None and b else None  # noqa: E731
        rows.append({
            "name": r["name"], "d": r["d_model"], "k": r["k"], "ratio": r["ratio"],
            "wire_ratio": None, "val": r["final_val"], "steps": r["steps"], "tokens": r["tokens"],
            "gap_same": rel(r["final_val"], same and same["final_val"]),
            "gap_adamw": rel(r["final_val"], adamw and adamw["final_val"]),
            "best": min(r["val_loss"]), "gap_best": rel(min(r["val_loss"]), same and min(same["val_loss"])),
            "bytes": r["bytes_per_token"], "step_ms": t["step_ms"],
            "step_rel": rel(t["step_ms"], tb and tb["step_ms"]),
            "mem_gb": (t["peak_mem"] or 0) / 2**30 if t["peak_mem"] else None,
            "mem_rel": rel(t["peak_mem"], tb and tb["peak_mem"]),
        })
    none_bytes = {r["d"]: r["bytes"] for r in rows if r["name"].startswith("none")}
    for row in rows:
        nb = none_bytes.get(row["d"])
        row["wire_ratio"] = nb / row["bytes"] if nb and row["bytes"] else None
    return rows


def fmt(v: Any, spec: str) -> str:
    """`v` formatted with `spec`, or "-" for None."""
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of summarise() rows."""
    head = ("| setting | d | k | r (wire) | val loss | gap vs same opt | gap vs AdamW base | best val (gap) | "
            "bytes/token/boundary fwd+bwd | step ms (rel) | peak GiB (rel) | tokens |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['d']} | {r['k']} | {r['ratio']} ({fmt(r['wire_ratio'], '.0f')}x) | "
            f"{r['val']:.4f} | {fmt(r['gap_same'], '+.2f')}% | {fmt(r['gap_adamw'], '+.2f')}% | "
            f"{r['best']:.4f} ({fmt(r['gap_best'], '+.2f')}%) | "
            f"{r['bytes']:.2f} | {fmt(r['step_ms'], '.1f')} ({fmt(r['step_rel'], '+.1f')}%) | "
            f"{fmt(r['mem_gb'], '.2f')} ({fmt(r['mem_rel'], '+.1f')}%) | {r['tokens'] / 1e6:.2f}M |")
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: str, names: list[str] | None = None) -> None:
    """Validation loss vs tokens for the named settings (default: every seed-0 bf16/fp8 main row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    chosen = [r for r in sorted(results, key=_key) if (names is None and r["setting"]["seed"] == 0)
              or (names is not None and r["name"] in names)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, opt in zip(axes, ("muon", "adamw")):
        for r in (r for r in chosen if r["setting"]["opt"] == opt):
            x = [s * r["tokens_per_step"] / 1e6 for s in r["val_steps"]]
            style = "-" if r["setting"]["boundary"] == "none" else "--" if r["setting"]["boundary"] == "naive" else "-."
            ax.plot(x[1:], r["val_loss"][1:], style, label=f"{r['name']} ({r['steps']} steps)", lw=1.3)
        ax.set_title(f"{opt}: validation loss vs tokens")
        ax.set_xlabel("tokens (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation loss (nats/token, BPE 4096)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
