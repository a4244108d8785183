"""A replica without a model for the sharded sync's bridge tests (run config `sync_mode: sharded`):
its hops go through the real bridge like `FakeWorker`'s; at each round's end it uploads random
pieces of each shard's exact size, reports them, merges the shards it is assigned into bytes
every honest merger derives alike (a hash of the frozen pieces), votes them, and in a checkpoint
round votes a checkpoint derived from the decided updates. `probe` (a hook) runs first in every
merge and `probe_votes` before its votes, for adversarial peers."""
from __future__ import annotations

import hashlib
import os
import time

from protocol.client import BridgeError
from protocol.routes import route
from tests.harness.fake_worker import FakeWorker

__all__ = ["ShardPeer", "derived"]

KEEP = hashlib.sha256(b"").hexdigest()


def derived(seed: str, size: int) -> bytes:
    """`size` bytes every peer derives alike from `seed` (sha256 in counter mode)."""
    out, i = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}|{i}".encode()).digest()
        i += 1
    return bytes(out[:size])


class ShardPeer(FakeWorker):
    """A fake sharded replica; `spec` is the bridge's SyncSpec for the run (exact sizes)."""

    def __init__(self, keypair, url, hotkey, stop, spec, checkpoint_every: int, total_rounds: int,
                 slow_rounds: tuple[int, ...] = ()):
        super().__init__(keypair, url, hotkey, stop)
        self.spec, self.k, self.total = spec, checkpoint_every, total_rounds
        self.slow_rounds = slow_rounds  # rounds in which it votes 1.5 s after the freeze
        self.me = keypair.ss58_address
        self.decided: dict[int, list] = {}   # round -> the view's decided sha256 per shard (None: kept)
        self.mine: dict[int, dict] = {}      # round -> {shard: sha256 this peer voted}
        self.views: dict[int, dict] = {}     # round -> the complete view
        self.worked: dict[int, int] = {}     # round -> hops it completed (0: a loaded box routed it none)
        self._hops_seen = 0

    # ----- wire helpers -----
    def grant(self, round_, kind, shard, data, size=None):
        """A sync_upload grant for `data` (declaring `size`), then the PUT."""
        sha = hashlib.sha256(data).hexdigest()
        g = self.c.post(route("sync_upload").path, {"round": round_, "kind": kind, "shard": shard,
                                                    "sha256": sha, "size": len(data) if size is None else size})
        assert self.http.put(g["put_url"], content=data).status_code == 200
        return sha

    def view(self, round_, stage):
        """GET the sync view of (round, stage)."""
        return self.c.get(route("sync_view").target(round=round_, stage=stage))

    def wait_view(self, round_, stage, ready, timeout=60.0):
        """Poll the view until `ready(view)`."""
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.stop_ev.is_set():
            try:
                v = self.view(round_, stage)
                if ready(v):
                    return v
            except BridgeError as exc:
                if exc.status != 409:
                    raise
            time.sleep(0.05)
        raise TimeoutError(f"view of round {round_} never ready")

    @staticmethod
    def update_bytes(view, shard: int, size: int) -> bytes:
        """An honest merger's update of `shard`: derived from the frozen pieces alone."""
        return derived("|".join([str(view["round"]), str(shard)] + [p["shas"][shard] for p in view["pieces"]]), size)

    # ----- the round end -----
    def probe(self, round_, stage):
        """Adversarial peers override this (runs before the honest report)."""

    def probe_votes(self, round_, stage, view):
        """Adversarial peers override this (runs once the set froze, before the honest votes)."""

    def report(self, round_, stage):
        """Upload exactly sized random pieces and report them (409s propagate)."""
        sizes = self.spec.pieces[stage]
        shas = [self.grant(round_, "pg", s, os.urandom(n)) for s, n in enumerate(sizes)]
        self.c.post(route("sync_pseudograd").path, {"round": round_, "shas": shas, "sizes": list(sizes)})
        return shas

    def merge(self, round_, stage):
        self.worked[round_], self._hops_seen = self.hops - self._hops_seen, self.hops
        self.probe(round_, stage)
        try:
            self.report(round_, stage)
        except BridgeError as exc:
            if exc.status != 409:
                raise
            self.merged_rounds.add(round_)  # not in the set: the next round starts without us
            return
        v = self.wait_view(round_, stage, lambda v: v["frozen"] and bool(v["mergers"]))
        self.probe_votes(round_, stage, v)
        if round_ in self.slow_rounds:
            time.sleep(1.5)
        votes = {}
        for s, hs in enumerate(v["mergers"]):
            if self.me in hs:
                data = self.update_bytes(v, s, self.spec.updates[stage][s])
                votes[s] = (self.grant(round_, "merged", s, data), len(data))
        if votes:
            self.c.post(route("sync_votes").path, {"round": round_, "votes": [
                {"shard": s, "sha256": sha, "size": n} for s, (sha, n) in sorted(votes.items())]})
        self.mine[round_] = {s: sha for s, (sha, _) in votes.items()}
        v = self.wait_view(round_, stage, lambda v: v["complete"] or v["published"])
        self.views[round_] = v
        self.decided[round_] = [None if d is None else d["sha256"] for d in v["decided"]]
        if (round_ + 1) % self.k == 0 or round_ + 1 == self.total:
            self.checkpoint(round_, v)
        self.merged_rounds.add(round_)

    def checkpoint(self, round_, view):
        """Vote the checkpoint every honest replica derives from the decided updates."""
        blob = derived("ckpt|" + "|".join(str(d) for d in self.decided[round_]), 256)
        sha = hashlib.sha256(blob).hexdigest()
        g = self.c.post(route("upload").path, {"round": round_, "kind": "state", "sha256": sha, "size": len(blob)})
        assert self.http.put(g["put_url"], content=blob).status_code == 200
        body = {"round": round_, "sha256": sha, "key": g["key"]}
        ack = self.c.post(route("merged").path, body)
        while not ack["published"] and not self.stop_ev.is_set():
            time.sleep(0.05)
            ack = self.c.post(route("merged").path, body)
