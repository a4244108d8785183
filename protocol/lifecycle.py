"""The words of a run's life cycle, shared by the bridge, the neurons and the wire.

Each is a `StrEnum`: a member *is* its string (`HopKind.FWD == "fwd"`, JSON `"fwd"`), so
messages and stored rows read and write exactly the bytes plain strings did.
"""
from __future__ import annotations

from enum import StrEnum

__all__ = ["Phase", "HopKind", "HopStatus", "SampleStatus", "HOP_OPEN"]


class Phase(StrEnum):
    """Where a run is: waiting for every stage to have a miner, training a round, merging it,
    or done."""

    WAITING = "waiting"
    TRAIN = "train"
    MERGE = "merge"
    DONE = "done"


class HopKind(StrEnum):
    """A hop's work: a forward, a backward, or the last stage's forward+loss+backward."""

    FWD = "fwd"
    BWD = "bwd"
    FWDBWD = "fwdbwd"

    @property
    def runs_forward(self) -> bool:
        """True for the kinds that compute a forward from an activation input."""
        return self is not HopKind.BWD


class HopStatus(StrEnum):
    """A hop attempt's status: open (`pool`, `assigned`, `leased`) or closed."""

    POOL = "pool"            # waiting in its stage's pool for any replica
    ASSIGNED = "assigned"    # routed to one replica, not yet leased
    LEASED = "leased"
    DONE = "done"
    EXPIRED = "expired"      # its lease ran out: the work went elsewhere
    FAILED = "failed"        # a claim about its inputs closed it
    REJECTED = "rejected"    # its output was proven bad (or lost) after done
    DROPPED = "dropped"


HOP_OPEN = (HopStatus.POOL, HopStatus.ASSIGNED, HopStatus.LEASED)  # still need work


class SampleStatus(StrEnum):
    """A sample of a round: active until it completes or is abandoned with a reason."""

    ACTIVE = "active"
    COMPLETED = "completed"
    ABANDONED = "abandoned"
