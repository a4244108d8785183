"""Validators' verdicts reach the bridge: a miner that failed an audit sits out for a while.

A quarantined miner gets no hops and no place in merge sets until `quarantined_until`, so a
cheater that was caught stops weighing on the model at once, also where too few replicas serve
a stage for the robust merge to outvote it. Any hotkey with a validator permit may report; a
verdict only ever removes a miner's work, never adds to anyone's weight.

No verdict empties a stage (`State.quarantined`): while a stage has no live replica in good
standing, its failed replicas keep it training on probation, unpaid (listed in the round's
`unpaid`, which validators give no credit), and the dashboard says so; the moment a replica in
good standing serves the stage again, the failed ones sit out.
"""
from __future__ import annotations

import logging

from bridge.records import State, TransitionError

__all__ = ["record_verdict"]

log = logging.getLogger(__name__)


def record_verdict(st: State, validator: str, round_: int, hotkey: str, passed: bool,
                   reason: str) -> int:
    """Apply one verdict; returns the round the miner's quarantine lasts until (-1: none)."""
    m = st.miners.get(hotkey)
    if m is None:
        raise TransitionError("unknown_hotkey", f"{hotkey} is not a registered miner")
    if round_ > st.round:
        raise TransitionError("future_round", f"round {round_} has not happened yet "
                              f"(run at round {st.round})")
    if passed or st.run.quarantine_rounds == 0:
        return m.quarantined_until
    until = max(m.quarantined_until, st.round + 1 + st.run.quarantine_rounds)
    if until != m.quarantined_until:
        m.quarantined_until = until
        st.wake_all = True
        log.warning("miner %s quarantined until round %d: validator %s failed it in round %d "
                    "(%s)", hotkey[:10], until, validator[:10], round_, reason[:200])
    return until
