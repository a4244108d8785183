"""Merge-level adversaries: replicas that lie in the outer round (docs/SECURITY.md, one row each).

`liar` votes for a state of its own making (re-derived until its sha256 sorts first, as an
attacker hoping for a hash-order tie-break would); `flip` uploads its pseudo-gradient with the
sign flipped; `huge` scales it by 1e6; `nan` puts NaN in it; `overwrite` re-uploads garbage to
its grants after each report (and, in drills.cheaters, to each hop output after done) (trying to change what was reported); `lazy` uploads zeros;
`withhold` never reports its pseudo-gradient (trying to hold the merge set open).
"""
from __future__ import annotations

import hashlib
import logging

import torch

from neurons.merge_compute import MergeOutcome
from neurons.round_merge import ReplicaMerge, RoundState
from resbm import outer

__all__ = ["MERGE_CHEATS", "merge_cheat"]

log = logging.getLogger("drills")


class _Flip(ReplicaMerge):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: -v for k, v in super().pseudo_gradient(state).items()}


class _Huge(ReplicaMerge):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: v * 1e6 for k, v in super().pseudo_gradient(state).items()}


class _Lazy(ReplicaMerge):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(v) for k, v in super().pseudo_gradient(state).items()}


class _NaN(ReplicaMerge):
    def pseudo_gradient(self, state: RoundState) -> dict[str, torch.Tensor]:
        pg = super().pseudo_gradient(state)
        first = sorted(pg)[0]
        pg[first] = pg[first].clone()
        pg[first].view(-1)[0] = float("nan")
        return pg


class _Liar(ReplicaMerge):
    """Votes at once for a state of its own (no merge computed), re-derived until its sha256
    sorts first, as an attacker hoping for a hash-order tie-break would."""

    def merged_state(self, state: RoundState, mset, fetched) -> MergeOutcome:
        name = sorted(state.theta_start)[0]
        best: MergeOutcome | None = None
        for i in range(8):
            theta = dict(state.theta_start)
            theta[name] = theta[name].clone()
            theta[name].view(-1)[0] += 0.01 * (i + 1)
            blob = outer.state_bytes(theta, state.momentum, state.ref_norm)
            h = hashlib.sha256(blob).hexdigest()
            if best is None or h < best.sha:
                best = MergeOutcome(theta, state.momentum, state.ref_norm, blob, h)
        log.warning("drill liar: voting %s.. (a state of its own)", best.sha[:10])
        return best


class _Overwrite(ReplicaMerge):
    def upload(self, rnd: int, kind: str, blob: bytes, sha: str | None = None) -> tuple[str, str]:
        key, sha = super().upload(rnd, kind, blob, sha)
        self._last = (rnd, kind, len(blob), sha)
        return key, sha

    def _report(self, rnd, sha, key):
        ack = super()._report(rnd, sha, key)
        self._clobber()
        return ack

    def run_round(self, state, rnd):
        out = super().run_round(state, rnd)
        self._clobber()
        return out

    def _clobber(self) -> None:
        """Re-PUT garbage of the same size through a fresh grant for the last upload."""
        from protocol.messages import UploadRequest
        if getattr(self, "_last", None) is None:
            return
        rnd, kind, size, sha = self._last
        try:
            grant = self.client.upload(UploadRequest(round=rnd, kind=kind, sha256=sha, size=size))
            self.transfer.put(grant.put_url, b"\0" * size)
            log.warning("drill overwrite: clobbered %s", grant.key)
        except Exception as exc:  # refused is the desired outcome
            log.info("drill overwrite: refused (%s)", str(exc)[:120])


class _Withhold(ReplicaMerge):
    """Works every hop but never reports its pseudo-gradient, hoping to hold the merge open."""

    def run_round(self, state, rnd):
        log.warning("drill withhold: not reporting round %d's pseudo-gradient", rnd)
        return state, None


MERGE_CHEATS = {"liar": _Liar, "flip": _Flip, "huge": _Huge, "nan": _NaN,
                "overwrite": _Overwrite, "lazy": _Lazy, "withhold": _Withhold}


def merge_cheat(kind: str) -> type[ReplicaMerge]:
    """The ReplicaMerge subclass of a merge-level cheat (honest merge for other kinds)."""
    return MERGE_CHEATS.get(kind, ReplicaMerge)
