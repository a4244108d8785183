"""The sharded sync screens every input a peer controls, through the real bridge process and a real
rclone S3, at R = 2 and R = 3 (one adversarial replica among them): wrong sizes, shard indices,
rounds, routes of the other sync mode, votes it may not cast, a re-registration between its work
and its report. Each is refused with its code before anything reaches a write-once final key, the
honest replicas' update is decided in every round, and merged updates a checkpoint superseded are
garbage-collected with the audit window."""
from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from bridge.syncspec import sync_spec
from protocol.client import BridgeError
from protocol.messages import RunConfig
from protocol.keys import PieceKey, UpdateKey
from protocol.routes import route
from tests.harness.shard_peer import KEEP, ShardPeer, derived
from tests.servers import make_chain, start_bridge, tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROUNDS, K, SHARDS = 6, 2, 4
WITHHOLD, REREGISTER = 1, 2  # rounds in which the adversary stays out of the set


class Adversary(ShardPeer):
    """Tries what a peer controls in every round, then (except in two rounds) merges honestly."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.by_round: dict[int, dict[str, set]] = {}  # round -> case -> {(status, code)}
        self.never: list[str] = []          # final keys that must never exist
        self.now = 0                        # the round being probed

    def refused(self, case, fn):
        try:
            fn()
        except BridgeError as exc:
            self.note(case, (exc.status, exc.code or "bad_request"))
            return
        self.note(case, (200, "accepted"))

    def note(self, case, answer):
        self.by_round.setdefault(self.now, {}).setdefault(case, set()).add(answer)

    def answers(self) -> dict[str, set]:
        """case -> answers over the rounds in which it had work (a loaded box may route it none: then
        its report is `no_work` before anything else is checked, which is right but not the case tried)."""
        out: dict[str, set] = {}
        for r, cases in self.by_round.items():
            for case, got in cases.items():
                if self.worked.get(r, 0) > 0 or f"round {r}" in case:  # those name the round they try
                    out.setdefault(case, set()).update(got)
        return out

    def ask(self, body):
        return lambda: self.c.post(route("sync_upload").path, body)

    def probe(self, round_, stage):
        self.now = round_
        exact = self.spec.pieces[stage][0]
        sha = hashlib.sha256(os.urandom(8)).hexdigest()
        grant = dict(round=round_, kind="pg", shard=0, sha256=sha, size=exact)
        for case, over in (("oversized grant", dict(size=exact + 4096)), ("undersized grant", dict(size=exact - 1)),
                           ("empty grant", dict(size=0)), ("shard past the last", dict(shard=SHARDS)),
                           ("shard 4095", dict(shard=4095)), ("negative shard", dict(shard=-1)),
                           ("huge shard", dict(shard=10**9)), ("next round", dict(round=round_ + 1)),
                           ("last round", dict(round=max(0, round_ - 1) if round_ else 10**6)),
                           ("merged grant before the freeze", dict(kind="merged", size=self.spec.updates[stage][0])),
                           ("malformed sha", dict(sha256="../" * 21 + "x"))):
            self.refused(case, self.ask({**grant, **over}))
        self.never.append(PieceKey("screen", round_, stage, self.me, 0, sha).final)
        sizes = list(self.spec.pieces[stage])
        shas = [hashlib.sha256(os.urandom(8)).hexdigest() for _ in sizes]
        report = lambda **kw: lambda: self.c.post(route("sync_pseudograd").path,  # noqa: E731
                                                   {"round": round_, "shas": shas, "sizes": sizes, **kw})
        self.refused("report: a shard too few", report(shas=shas[:-1], sizes=sizes[:-1]))
        self.refused("report: sizes off by one", report(sizes=[n + 1 for n in sizes]))
        self.refused("report: nothing uploaded", report())
        self.never += [PieceKey("screen", round_, stage, self.me, s, h).final for s, h in enumerate(shas)]
        up = lambda kind: lambda: self.c.post(route("upload").path, {  # noqa: E731
            "round": round_, "kind": kind, "sha256": sha, "size": 64})
        self.refused("whole-state pseudo-gradient grant", up("pseudograd"))
        self.refused("whole-state pseudo-gradient report", lambda: self.c.post(route("pseudograd").path, {
            "round": round_, "key": f"runs/screen/r{round_}/s{stage}/upload/{self.me}/pg-{sha}",
            "sha256": sha, "size": 64}))
        if (round_ + 1) % K:
            self.refused("state vote outside a checkpoint round", up("state"))
        self.refused("view of a future round", lambda: self.view(round_ + 5, stage))
        self.refused("view of a stage that does not exist", lambda: self.view(round_, 7))
        if round_ == REREGISTER:  # registers again after its work: nothing of it can be merged
            self.c.post(route("register").path, {})

    def report(self, round_, stage):
        if round_ == WITHHOLD:
            raise BridgeError(409, json.dumps({"error": "withheld"}))
        try:
            return super().report(round_, stage)
        except BridgeError as exc:
            self.note(f"report in round {round_}", (exc.status, exc.code))
            raise

    def merge(self, round_, stage):
        super().merge(round_, stage)
        if round_ in (WITHHOLD, REREGISTER):  # out of the set: it may not vote or upload an update
            v = self.wait_view(round_, stage, lambda v: v["frozen"])
            size = self.spec.updates[stage][0]
            data = derived(f"lie|{round_}", size)
            sha = hashlib.sha256(data).hexdigest()
            self.refused(f"merged grant outside the set (round {round_})", self.ask(dict(
                round=round_, kind="merged", shard=0, sha256=sha, size=size)))
            self.refused(f"vote outside the set (round {round_})", lambda: self.c.post(route("sync_votes").path, {
                "round": round_, "votes": [{"shard": 0, "sha256": sha, "size": size}]}))
            self.never.append(UpdateKey("screen", round_, stage, 0, self.me, sha).final)
            assert v["frozen"]

    def probe_votes(self, round_, stage, view):
        mine = [s for s, hs in enumerate(view["mergers"]) if self.me in hs]
        others = [s for s, hs in enumerate(view["mergers"]) if self.me not in hs]
        size = self.spec.updates[stage][mine[0]]
        vote = lambda *vs: lambda: self.c.post(route("sync_votes").path, {  # noqa: E731
            "round": round_, "votes": [{"shard": s, "sha256": h, "size": n} for s, h, n in vs]})
        # a lie staged first (its grant is allowed: nothing voted yet), voted after the honest vote
        lie = derived(f"lie|{round_}|{mine[0]}", size)
        lie_sha = self.grant(round_, "merged", mine[0], lie)
        self.never.append(UpdateKey("screen", round_, stage, mine[0], self.me, lie_sha).final)
        honest = self.update_bytes(view, mine[0], size)
        h_sha = self.grant(round_, "merged", mine[0], honest)
        self.refused("vote: shard past the last", vote((SHARDS, h_sha, size)))
        self.refused("vote: a shard twice", vote((mine[0], h_sha, size), (mine[0], lie_sha, size)))
        self.refused("vote: wrong size", vote((mine[0], h_sha, size + 1)))
        self.refused("vote: keep with a size", vote((mine[0], KEEP, 5)))
        self.refused("vote: wrong round", lambda: self.c.post(route("sync_votes").path, {
            "round": round_ + 1, "votes": [{"shard": mine[0], "sha256": h_sha, "size": size}]}))
        self.refused("vote: malformed sha", vote((mine[0], "z" * 64, size)))
        if others:  # R = 3: shards it does not merge
            o = others[0]
            self.refused("merged grant for a shard it does not merge", self.ask(dict(
                round=round_, kind="merged", shard=o, sha256=lie_sha, size=self.spec.updates[stage][o])))
            self.refused("vote for a shard it does not merge", vote((o, lie_sha, self.spec.updates[stage][o])))
            self.never.append(UpdateKey("screen", round_, stage, o, self.me, lie_sha).final)
        self.c.post(route("sync_votes").path, {"round": round_, "votes": [
            {"shard": mine[0], "sha256": h_sha, "size": size}]})  # the honest vote
        self.refused("vote changed after it was cast", vote((mine[0], lie_sha, size)))
        self.refused("merged grant for another update after voting", self.ask(dict(
            round=round_, kind="merged", shard=mine[0], sha256=lie_sha, size=size)))
        self.refused("report repeated with other pieces", lambda: self.c.post(route("sync_pseudograd").path, {
            "round": round_, "shas": [lie_sha] * SHARDS, "sizes": list(self.spec.pieces[stage])}))


EXPECTED = {  # case -> the one answer it must get, in every round it is tried
    "oversized grant": (400, "bad_size"), "undersized grant": (400, "bad_size"),
    "empty grant": (400, "bad_request"), "shard past the last": (400, "bad_shard"),
    "shard 4095": (400, "bad_shard"), "negative shard": (400, "bad_request"), "huge shard": (400, "bad_request"),
    "next round": (409, "not_merging"), "last round": (409, "not_merging"),
    "merged grant before the freeze": (409, "not_frozen"), "malformed sha": (400, "bad_request"),
    "report: a shard too few": (400, "bad_shards"), "report: sizes off by one": (400, "bad_size"),
    "report: nothing uploaded": (400, "missing_object"),
    "whole-state pseudo-gradient grant": (409, "sharded_run"),
    "whole-state pseudo-gradient report": (409, "sharded_run"),
    "state vote outside a checkpoint round": (409, "not_checkpoint"),
    "view of a future round": (409, "future_round"), "view of a stage that does not exist": (404, "unknown_stage"),
    "vote: shard past the last": (400, "bad_shard"), "vote: a shard twice": (400, "bad_shard"),
    "vote: wrong size": (400, "bad_size"), "vote: keep with a size": (400, "bad_size"),
    "vote: wrong round": (409, "not_merging"), "vote: malformed sha": (400, "bad_request"),
    "merged grant for a shard it does not merge": (409, "not_a_merger"),
    "vote for a shard it does not merge": (409, "not_a_merger"),
    "vote changed after it was cast": (409, "already_voted"),
    "merged grant for another update after voting": (409, "already_voted"),
    "report repeated with other pieces": (409, "already_reported"),
    f"report in round {REREGISTER}": (409, "no_work"),
    f"merged grant outside the set (round {WITHHOLD})": (409, "not_a_merger"),
    f"vote outside the set (round {WITHHOLD})": (409, "not_a_merger"),
    f"merged grant outside the set (round {REREGISTER})": (409, "not_a_merger"),
    f"vote outside the set (round {REREGISTER})": (409, "not_a_merger"),
}


@pytest.mark.parametrize("replicas", [2, 3])
def test_every_peer_input_is_screened_before_the_store_and_the_honest_update_is_decided(tmp_path, s3_server,
                                                                                      replicas):
    cfg = tiny_run_config(run_id="screen", n_stages=1, total_rounds=ROUNDS, samples_per_round=4 * replicas,
                          sync_mode="sharded", sync_shards=SHARDS, sync_mergers=2, sync_block=64,
                          checkpoint_every=K, audit_window_rounds=1, vote_timeout_seconds=8.0,
                          arbitration_timeout_seconds=5.0, lease_seconds=30.0)
    spec = sync_spec(RunConfig(**cfg))
    _, keys = make_chain(tmp_path / "chain.db", miners=replicas, validators=0)
    b = start_bridge(tmp_path, cfg, tmp_path / "chain.db", s3_server)
    stop = threading.Event()
    peers = [ShardPeer(k, b.url, b.hotkey, stop, spec, K, ROUNDS, slow_rounds=(WITHHOLD, REREGISTER))
             for k in keys["miners"][:-1]]
    adv = Adversary(keys["miners"][-1], b.url, b.hotkey, stop, spec, K, ROUNDS)
    try:
        for p in [*peers, adv]:
            p.start()
        for p in [*peers, adv]:
            p.join(timeout=240)
        assert all(not p.is_alive() and p.error is None for p in [*peers, adv]), [p.error for p in [*peers, adv]]
        assert any(adv.worked.get(r, 0) for r in range(ROUNDS) if r not in (WITHHOLD, REREGISTER)), adv.worked
        got = adv.answers()
        for case, want in EXPECTED.items():
            if "does not merge" in case and replicas == 2:
                continue  # with two mergers per shard and two replicas, it merges every shard
            assert got.get(case) == {want}, (case, got.get(case))
        # the honest update is decided in every round: every shard, the bytes honest mergers derive;
        # a peer routed no work in a round (a loaded box) is not in its set and learns it later
        assert set().union(*(p.decided for p in peers)) == set(range(ROUNDS)), [sorted(p.decided) for p in peers]
        for p in peers:
            assert {r for r, n in p.worked.items() if n} <= set(p.decided), (p.worked, sorted(p.decided))
            for r, v in p.views.items():
                want = [hashlib.sha256(ShardPeer.update_bytes(v, s, spec.updates[0][s])).hexdigest()
                        for s in range(SHARDS)]
                assert p.decided[r] == want, (r, p.decided[r], want)
                in_set = {x["hotkey"] for x in v["pieces"]}
                assert (adv.me in in_set) == (adv.worked[r] > 0 and r not in (WITHHOLD, REREGISTER)), (r, in_set)
        # nothing a refused request named reached the store; the adversary's only final keys are
        # the pieces and honest votes the bridge accepted
        store = s3_server.storage()
        keys_now = set(store.list("runs/screen/"))
        assert not [k for k in adv.never if k in keys_now]
        accepted = {UpdateKey("screen", r, 0, s, adv.me, sha).final for r, m in adv.mine.items() for s, sha in m.items()}
        accepted |= {UpdateKey("screen", r, 0, s, adv.me, sha).final for r, m in adv.views.items()
                     for s, sha in _adv_votes(m, adv.me).items()}
        finals = {k for k in keys_now if f"/{adv.me}-" in k and "/upload-" not in k and "/sync/r" in k}
        assert finals <= accepted, finals - accepted
        # GC: merged updates the checkpoints superseded are gone with the audit window (round 0),
        # those still in the bridge's update log are kept
        assert not store.list("runs/screen/sync/r0/")
        assert store.list(f"runs/screen/sync/r{ROUNDS - 1}/")
    finally:
        stop.set()
        b.stop()


def _adv_votes(view: dict, hotkey: str) -> dict[int, str]:
    """{shard: sha256} the adversary voted in a complete view."""
    return {s: v[hotkey] for s, v in enumerate(view["votes"]) if hotkey in v}
