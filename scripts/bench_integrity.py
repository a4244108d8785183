"""Integrity drills as a benchmark: every merge-level attack class at 2 and 3 replicas per stage,
against honest-only runs of the same size and several seeds, through real servers (rclone S3, the
bridge process, LocalChain) with the real miners and validator (tests/harness). Prints a table.

    .venv/bin/python scripts/bench_integrity.py --seeds 2 --rounds 4

Run from a checkout (it uses tests/harness). Columns: the final validation loss, its gap to the
honest-only run of the same seed and size (the cheater's replica honest instead) (and the seed-to-seed spread of the honest-only runs), the
cheater's and the honest miners' weights, abandoned samples, and whether every published state
was one the honest replicas voted for.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.subnet import Outcome, Scenario, run_scenario  # noqa: E402

__all__ = ["main"]

PAIRS = (("liar", "flip"), ("huge", "nan"), ("overwrite", "lazy"))


def honest_published(out: Outcome) -> bool:
    """No honest replica's vote ever differed from what was published."""
    honest = {out.names[n] for n in out.honest()}
    return not any(h in honest for log in out.hoplogs for h in log.flagged)


def row(label: str, r: int, out: Outcome, base: Outcome | None, wall: float) -> str:
    """One line of the table."""
    cheat_w = max((out.weights[n] for n in out.cheaters()), default=0.0)
    honest_w = min(out.weights[n] for n in out.honest())
    gap = f"{100 * (out.val_loss / base.val_loss - 1):+6.2f}%" if base else "   base"
    return (f"{label:<16} {r:>2} {out.val_loss:8.4f} {gap:>8} {cheat_w:7.3f} {honest_w:7.3f} "
            f"{out.metrics.abandoned_total:5d} {str(honest_published(out)):>6} {wall:6.1f}")


def main(argv=None) -> int:
    """Run the grid and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="seeds per row (>= 2 for the noise column)")
    p.add_argument("--rounds", type=int, default=4, help="rounds per run")
    p.add_argument("--replicas", type=int, nargs="+", default=[2, 3], help="replicas per stage with the cheater")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print(f"{'attack':<16} {'R':>2} {'val':>8} {'vs hon.':>8} {'cheat w':>7} {'min hon':>7} "
          f"{'aband':>5} {'honest':>6} {'wall s':>6}")
    for r in args.replicas:
        bases, noise = {}, []
        for seed in range(1, args.seeds + 1):
            t0 = time.monotonic()
            sc = Scenario(honest_per_stage=r, rounds=args.rounds, seed=seed)  # the cheater, honest
            bases[seed] = run_scenario(Path(tempfile.mkdtemp()), sc)
            print(row(f"honest-only s{seed}", r, bases[seed], None, time.monotonic() - t0), flush=True)
            noise.append(bases[seed].val_loss)
        if len(noise) > 1:
            spread = (max(noise) - min(noise)) / statistics.mean(noise)
            print(f"{'  seed spread':<16} {r:>2} {'':8} {100 * spread:7.2f}%", flush=True)
        for pair in PAIRS:
            for seed in range(1, args.seeds + 1):
                t0 = time.monotonic()
                sc = Scenario(honest_per_stage=r - 1, cheaters=pair, rounds=args.rounds, seed=seed)
                out = run_scenario(Path(tempfile.mkdtemp()), sc)
                print(row(f"{'+'.join(pair)} s{seed}", r, out, bases[seed], time.monotonic() - t0), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
