"""Refused sync requests never touch the store: the bridge's sharded-sync routes (`ShardApi`, the
service layer the HTTP handlers call) over a real rclone S3 through a `Storage` that counts every
call it makes. Thousands of out-of-range, wrongly sized or unentitled votes and grants are refused
with their codes and cost no HEAD, COPY, PUT or DELETE, and leave nothing at a final key; an
accepted vote does exactly the copies it needs."""
from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter

import pytest

from bridge import rounds, shard_round, state
from bridge.db import Database
from bridge.records import Tunables, TransitionError
from bridge.service import BridgeService
from bridge.shard_api import ShardApi
from bridge.storage import Storage
from bridge.syncspec import sync_spec
from protocol.messages import RunConfig
from protocol.keys import PieceKey, UpdateKey, staging_of
from protocol.sync_api import ShardVote, SyncUpload, SyncVotes
from tests.harness.bridge_state import drive
from tests.servers import tiny_run_config


class CountingStorage(Storage):
    """The real S3 client, counting the calls that reach the store."""

    def __init__(self, *a, **kw):
        self.calls: Counter = Counter()
        super().__init__(*a, **kw)

    def _count(self, name, fn, *a, **kw):
        self.calls[name] += 1
        return fn(*a, **kw)

    def head(self, key):
        return self._count("head", super().head, key)

    def copy(self, src, dst, size=0):
        return self._count("copy", super().copy, src, dst, size)

    def delete(self, keys):
        return self._count("delete", super().delete, keys)

    def get(self, key, max_bytes):
        return self._count("get", super().get, key, max_bytes)


@pytest.fixture()
def merging(tmp_path, s3_server):
    """A sharded run of one stage and three replicas, in its merge phase with the set frozen."""
    run = RunConfig(**tiny_run_config(run_id="count", n_stages=1, samples_per_round=12, sync_mode="sharded",
                                      sync_shards=4, sync_mergers=2, sync_block=64, checkpoint_every=5,
                                      total_rounds=5))
    spec = sync_spec(run)
    storage = CountingStorage(s3_server.endpoint, f"count{random.randrange(10**9)}", s3_server.access_key,
                              s3_server.secret_key)
    svc = BridgeService(run, Database(tmp_path / "b.db"), storage, Tunables(sync=spec), seed=0)
    hks = ["alice", "bob", "carol"]
    rng = random.Random(0)

    def setup(st, now, _):
        for hk in hks:
            state.register(st, hk, now, rng)
        now = drive(st, hks, rng, now)
        for hk in hks:
            m = st.miners[hk]
            if m.step_samples:
                state.step_done(st, hk, st.round, m.inner_step, m.step_samples, now)
            shas = [hashlib.sha256(f"{hk}{s}".encode()).hexdigest() for s in range(4)]
            finals = [PieceKey("count", 0, 0, hk, s, h).final for s, h in enumerate(shas)]
            rounds.report_pieces(st, hk, 0, shas, list(spec.pieces[0]), finals, now)
        return shard_round.ballot(st, 0, 0, now).mergers
    mergers = svc.apply(setup)
    return svc, ShardApi(svc, 300.0), storage, spec, mergers


def test_thousands_of_refused_votes_and_grants_cost_no_store_access(merging):
    svc, api, storage, spec, mergers = merging
    me = mergers[0][0]
    not_mine = next(s for s, hs in enumerate(mergers) if me not in hs)
    size = spec.updates[0][0]
    sha = hashlib.sha256(b"x").hexdigest()
    bad_votes = [  # (code, votes)
        ("bad_shard", [ShardVote(shard=4 + i % 4000, sha256=sha, size=size)]) for i in range(1500)]
    bad_votes += [("bad_size", [ShardVote(shard=0, sha256=sha, size=size + 1 + i)]) for i in range(500)]
    bad_votes += [("not_a_merger", [ShardVote(shard=not_mine, sha256=sha, size=spec.updates[0][not_mine])])] * 500
    bad_votes += [("bad_shard", [ShardVote(shard=s, sha256=sha, size=size) for s in range(4, 4096)])]
    bad_votes += [("bad_shard", [ShardVote(shard=0, sha256=sha, size=size)] * 2)]
    codes: Counter = Counter()

    async def hammer():
        for want, votes in bad_votes:
            with pytest.raises(TransitionError) as e:
                await api.sync_votes(me, SyncVotes(round=0, votes=votes))
            assert e.value.code == want, (want, e.value.code)
            codes[want] += 1
        for shard in (4, 99, 4095):
            with pytest.raises(TransitionError) as e:
                await api.sync_upload(me, SyncUpload(round=0, kind="merged", shard=shard, sha256=sha, size=size))
            codes[e.value.code] += 1
        with pytest.raises(TransitionError) as e:
            await api.sync_upload(me, SyncUpload(round=0, kind="pg", shard=0, sha256=sha, size=10**9))
        codes[e.value.code] += 1
    asyncio.run(hammer())
    assert sum(codes.values()) == len(bad_votes) + 4 and codes["bad_size"] == 501
    assert sum(storage.calls.values()) == 0, storage.calls  # not one HEAD, COPY, GET or DELETE
    assert not storage.list("runs/count/sync/")

    async def vote_honestly():  # the accepted path: one HEAD and one COPY per update voted
        blob = b"\1" * size
        good = hashlib.sha256(blob).hexdigest()
        final = UpdateKey("count", 0, 0, 0, me, good).final
        storage.put(staging_of(final), blob)
        ack = await api.sync_votes(me, SyncVotes(round=0, votes=[ShardVote(shard=0, sha256=good, size=size)]))
        return final, ack
    final, ack = asyncio.run(vote_honestly())
    assert ack.agreed == {0: None} and storage.calls == Counter(head=1, copy=1)
    finals = [k for k in storage.list("runs/count/sync/") if "/upload-" not in k]
    assert finals == [final]  # the one accepted vote's copy, and nothing else at a final key
