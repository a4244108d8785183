"""Drill entry point: a cheating miner with the honest miner's flags plus `--cheat KIND`.

    python -m drills.miner --cheat liar --wallet.name W --wallet.hotkey H ...
"""
from __future__ import annotations

import sys

from drills.cheaters import CHEATERS, cheating_miner
from neurons.miner import build_parser, main as miner_main

__all__ = ["main"]


def main(argv=None) -> int:
    """Run a cheating miner until stopped."""
    p = build_parser()
    p.prog = "drills.miner"
    p.add_argument("--cheat", required=True, choices=("honest",) + CHEATERS,
                   help="the adversary to play (docs/SECURITY.md)")
    return miner_main(argv, parser=p, make_miner=lambda args, **kw: cheating_miner(args.cheat, **kw))


if __name__ == "__main__":
    sys.exit(main())
