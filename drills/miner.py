"""Drill entry point: a cheating miner with the honest miner's flags plus `--cheat KIND`.

    python -m drills.miner --cheat liar --wallet.name W --wallet.hotkey H ...
"""
from __future__ import annotations

import sys

from drills.cheaters import CHEATERS, cheating_miner
from neurons.miner import MinerSettings, main as miner_main
from protocol.settings import flag

__all__ = ["main", "DrillMinerSettings"]


class DrillMinerSettings(MinerSettings):
    """The honest miner's settings plus the adversary to play."""

    cheat: str = flag("honest", "the adversary to play (docs/SECURITY.md): honest, " + ", ".join(CHEATERS),
                      choices=("honest",) + CHEATERS)


def main(argv=None) -> int:
    """Run a cheating miner until stopped."""
    return miner_main(argv, settings=DrillMinerSettings, prog="drills.miner",
                      make_miner=lambda args, **kw: cheating_miner(args.cheat, **kw))


if __name__ == "__main__":
    sys.exit(main())
