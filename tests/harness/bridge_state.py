"""Driving the bridge's pure state machine in tests: a tiny run's state, leases, hops done by
honest miners until a round leaves `train`."""
from __future__ import annotations

import hashlib

from bridge import rounds, state, votes
from bridge.records import State, Tunables
from protocol.messages import RunConfig

__all__ = ["SHA", "do_hop", "drive", "lease", "make", "report_pseudograd", "vote_state", "merge_round"]

SHA = "ab" * 32


def make(n_stages: int = 2, code_bytes: int | None = None, **over) -> State:
    """A fresh bridge state for a tiny run (override any RunConfig field; `code_bytes`: the
    encoded size of one code, which the bridge checks hop outputs against)."""
    cfg = dict(run_id="t", model={}, n_stages=n_stages, batch_size=1, micro_batches_per_step=2,
               inner_steps_per_round=2, samples_per_round=8, muon_lr=0.02, adamw_lr=0.003,
               total_rounds=2, data_seed=1, init_seed=2, lease_seconds=10.0, max_attempts=3,
               max_object_bytes=1000, merge_timeout_seconds=50.0)
    cfg.update(over)
    return State(run=RunConfig(**cfg), tun=Tunables(health_timeout=30.0, backoff_seconds=5.0,
                                                    code_bytes=code_bytes))


def do_hop(st, hk, hop, now, rng):
    """Report `hop` done by `hk` (a fixed sha256 where it has an output)."""
    state.complete(st, hk, hop.hop_id, SHA if hop.out_key else None, hop.out_size, 1.5, now, rng)


def lease(st, hk, now, rng, n=1):
    """Lease up to `n` hops for `hk`: (action, hops, retry_after)."""
    return state.lease(st, hk, n, 100, 100, now, rng)


def drive(st, hks, rng, now, max_iter=500, skip=(), finish=True):
    """Run honest miners until the round leaves `train` (or for `max_iter` ticks when not
    `finish`); returns the time reached."""
    for _ in range(max_iter):
        if st.phase != "train":
            return now
        now += 0.1
        for hk in hks:
            if hk in skip:
                continue
            action, hops, _ = lease(st, hk, now, rng, 2)
            for h in hops:
                do_hop(st, hk, h, now, rng)
            if action == "step":
                m = st.miners[hk]
                state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)
    if not finish:
        return now
    raise AssertionError("round did not finish")


def report_pseudograd(st, hk, now):
    """`hk` steps its last inner step if it has samples pending, then reports a pseudo-gradient."""
    m = st.miners[hk]
    if m.step_samples:
        state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)
    sha = hashlib.sha256(hk.encode()).hexdigest()
    final = rounds.check_upload_key(st, hk, st.round, "pseudograd",
                                    rounds.merge_upload_key(st, hk, st.round, "pseudograd", sha), sha)
    rounds.report_pseudograd(st, hk, st.round, final, sha, 10, now)


def vote_state(st, hk, sha, now):
    """`hk` votes for merged state `sha` (copied to its final key); whether it agrees (None: undecided)."""
    r = st.round
    final = rounds.check_upload_key(st, hk, r, "state", rounds.merge_upload_key(st, hk, r, "state", sha), sha)
    return votes.report_merged(st, hk, r, sha, final, 7, now)


def merge_round(st, now, cast):
    """Every miner that worked reports its pseudo-gradient; then the given votes are cast in order."""
    for hk in sorted(st.miners):
        if st.miners[hk].round_steps or st.miners[hk].step_samples:
            report_pseudograd(st, hk, now)
    return {hk: vote_state(st, hk, sha, now) for hk, sha in cast.items()}
