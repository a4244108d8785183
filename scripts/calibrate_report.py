"""The analysis half of scripts/calibrate_audit.py: tolerances from a calibration's raw errors,
held-out false positives, cheater separation, the printed tables and the YAML fragment."""
from __future__ import annotations

from pathlib import Path

import yaml

from neurons.audit_calibration import (CalibrationKey, HopError, derive_tolerances, honest_spread, passes,
                                       separation, step_range)
from resbm.config import ModelConfig

__all__ = ["analyse", "TARGET_REPLAYS"]

TARGET_REPLAYS = 1000  # issue 21: 0 false positives in at least this many honest replays


def _keys(report: dict, gpu: str | None) -> dict[str, CalibrationKey]:
    if "keys" in report:
        return {k: CalibrationKey(**v) for k, v in report["keys"].items()}
    model = ModelConfig.from_dict(report["config"]["model"]).config_hash()
    if gpu is None:
        print("warning: this raw file does not say which GPU it was measured on; its entries apply to any "
              "GPU of the device class (give --gpu to key them)")
    return {k: CalibrationKey(miner=report["miner"], replay=k, model=model, miner_gpu=gpu or "*",
                              replay_gpu=(gpu or "*") if not k.startswith("cpu") else "")
            for k in report["honest"]}


def _table(tolerances: list) -> dict:
    return {(t.stage, t.kind, (t.step_from, t.step_to)): t for t in tolerances}


def _judge(table: dict, e: HopError, h: int):
    return table.get((e.stage, e.kind, step_range(e.kind, e.step, h)))


def analyse(report: dict, margin: float, out: str, gpu: str | None = None) -> dict:
    """Tolerances from every honest round (x margin), checked by two-way held-out halves; cheater
    separation; prints the tables and writes the YAML fragment."""
    h = int(report["config"]["inner_steps"])
    keys = _keys(report, gpu)
    honest = {k: [[HopError(**e) for e in rr] for rr in v] for k, v in report["honest"].items()}
    cheats = {k: [[HopError(**e) for e in a] for a in v] for k, v in report["cheat_errors"].items()}
    entries, summary = [], {"margin": margin, "classes": {}, "cheats": {}}

    def false_positives(fit, test, key) -> tuple[int, int]:
        table = _table(derive_tolerances(honest_spread((e for rr in fit for e in rr), h), key, margin=margin))
        judged = [(e, _judge(table, e, h)) for rr in test for e in rr]
        judged = [(e, t) for e, t in judged if t is not None]
        return sum(not passes(e, t) for e, t in judged), len(judged)

    first = next(iter(honest))
    for name, rounds in honest.items():
        half = max(1, len(rounds) // 2)
        full = honest_spread((e for rr in rounds for e in rr), h)
        tol = derive_tolerances(full, keys[name], margin=margin)
        entries += tol
        table = _table(tol)
        fp_a, n_a = false_positives(rounds[:half], rounds[half:], keys[name])
        fp_b, n_b = false_positives(rounds[half:], rounds[:half], keys[name])
        n = sum(len(rr) for rr in rounds)
        k = keys[name]
        print(f"\nminer {k.miner}{' on ' + k.miner_gpu if k.miner_gpu not in ('', '*') else ''} replayed as {name}"
              f"{' on ' + k.replay_gpu if k.replay_gpu not in ('', '*') else ''}, model {k.model}: {n} honest "
              f"replays in {len(rounds)} rounds of H = {h} (entries cover inner steps 0-{h - 1}); tolerance = "
              f"{margin:g} x the honest max. Held out: fit on the first half, {fp_a} false positives of {n_a}; "
              f"fit on the second half, {fp_b} of {n_b}")
        print(f"{'stage':>5} {'kind':>10} {'steps':>6} {'n':>5} {'max rel err':>12} {'min cos':>10} "
              f"{'|norm-1|':>9} {'|dloss|':>9} {'tol rel':>9}")
        for (s, kind, (lo, hi)), sp in sorted(full.items()):
            print(f"{s:>5} {kind:>10} {f'{lo}-{hi}':>6} {sp.n:>5} {sp.rel_err:>12.3e} {sp.min_cosine:>10.6f} "
                  f"{sp.norm_dev:>9.2e} {sp.loss_diff:>9.2e} {table[(s, kind, (lo, hi))].rel_err:>9.3e}")
        met = n >= TARGET_REPLAYS and fp_a + fp_b == 0
        print(f"target: 0 false positives in >= {TARGET_REPLAYS} honest replays: {n} replays, "
              f"{fp_a + fp_b} held-out false positives -> {'met' if met else 'NOT met'}")
        summary["classes"][name] = {"hops": n, "held_out": [[fp_a, n_a], [fp_b, n_b]], "target_met": met}
        if name == first:
            spread_main, table_main = full, table
    print(f"\ncheaters (replayed as {first}): per audit, its worst hop's error / the largest honest error "
          f"of that stage and kind (target >= 5); audits caught under the written tolerances")
    print(f"{'cheat':>8} {'audits':>6} {'min sep':>9} {'caught':>7}")
    for kind, audits in cheats.items():
        seps = [separation(a, spread_main, h) for a in audits]
        caught = sum(any(not passes(e, t) for e in a if (t := _judge(table_main, e, h)) is not None)
                     for a in audits)
        print(f"{kind:>8} {len(audits):>6} {min(seps, default=0.0):>9.3g} {caught:>4}/{len(audits)}")
        summary["cheats"][kind] = {"audits": len(audits), "min_separation": min(seps, default=0.0), "caught": caught}
    Path(out).write_text(yaml.safe_dump(
        {"audit_tolerances": [e.model_dump(exclude_none=True) for e in entries]}, sort_keys=False))
    print(f"\nwrote {len(entries)} tolerances to {out}")
    return summary
