"""Adversarial miners for drills and tests: each cheater is a subclass of the honest `Miner`
that changes exactly what that adversary would change. The shipped miner carries none of this;
run a cheater with `python -m drills.miner --cheat KIND ...` (same flags as neurons/miner.py)."""
from drills.cheaters import CHEATERS, cheating_miner

__all__ = ["CHEATERS", "cheating_miner"]
