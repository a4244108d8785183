"""Suggest `model.stage_layers` from measured runs: each stage's compute per sample under each split,
read from `bench_network.py --json` files, fitted per stage (resbm/stage_balance.py).

    python scripts/balance_stages.py /tmp/bn-5-1.json /tmp/bn-4-2.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.exits import Exit, Misconfigured, exits_cleanly

__all__ = ["measured_split", "main"]


def measured_split(doc: dict) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(blocks per stage, compute seconds per sample per stage) of one bench_network JSON document."""
    args, r = doc["args"], doc["results"][-1]
    layers = tuple(int(x) for x in args["stage_layers"].split(","))
    per_stage: dict[int, float] = {}
    for m in r["miners"]:
        per_stage[m["stage"]] = per_stage.get(m["stage"], 0.0) + m["compute_s"]
    return layers, tuple(per_stage[s] / r["samples"] for s in sorted(per_stage))


@exits_cleanly
def main(argv=None) -> int:
    """Print each run's stage times and the split that balances them."""
    p = argparse.ArgumentParser(prog="balance_stages", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="bench_network.py --json files of runs with different --stage-layers")
    args = p.parse_args(argv)
    from resbm.stage_balance import balance_from_runs, imbalance
    runs = []
    for f in args.runs:
        try:
            runs.append(measured_split(json.loads(Path(f).read_text())))
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise Misconfigured(Exit.USAGE, f"{f} is not a bench_network.py --json result with --stage-layers "
                                f"and subnet runs ({type(exc).__name__}: {exc})") from None
    print("| blocks per stage | compute s per sample per stage | the faster stage waits |")
    print("|---|---|---|")
    for layers, secs in runs:
        print(f"| {','.join(map(str, layers))} | {' / '.join(f'{x:.3f}' for x in secs)} | {100 * imbalance(secs):.0f}% |")
    try:
        b = balance_from_runs(runs)
    except ValueError as exc:
        raise Misconfigured(Exit.USAGE, str(exc)) from None
    print(f"suggested --stage-layers {','.join(map(str, b.layers))}: predicted "
          f"{' / '.join(f'{x:.3f}' for x in b.predicted)} s per sample, the faster stage waiting {100 * b.after:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
