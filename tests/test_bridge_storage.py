"""Presigned URLs against a real SigV4-checking S3 server (rclone serve s3)."""
from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest

from bridge.storage import Storage


@pytest.fixture(scope="module")
def store(s3_server) -> Storage:
    return s3_server.storage("storage-test")


def test_presigned_put_writes_exactly_its_key_and_size(store):
    data = os.urandom(64)
    url = store.presign_put("runs/x/r0/s0/act/h1", len(data), 30)
    assert httpx.put(url, content=data).status_code == 200
    assert store.head("runs/x/r0/s0/act/h1") == 64
    assert httpx.get(store.presign_get("runs/x/r0/s0/act/h1", 30)).content == data
    # identical re-upload through the same URL is fine (objects are content-addressed)
    assert httpx.put(url, content=data).status_code == 200
    # another key with the same signature: refused
    other = url.replace("/act/h1?", "/act/h2?")
    assert httpx.put(other, content=data).status_code == 403
    assert store.head("runs/x/r0/s0/act/h2") is None


def test_presigned_put_refuses_more_or_fewer_bytes_than_signed(store):
    url = store.presign_put("runs/x/r0/s0/act/h3", 32, 30)
    assert httpx.put(url, content=os.urandom(33)).status_code in (400, 403)
    assert httpx.put(url, content=os.urandom(31)).status_code in (400, 403)
    assert store.head("runs/x/r0/s0/act/h3") is None


def test_presigned_put_expires(store):
    url = store.presign_put("runs/x/r0/s0/act/h4", 8, 1)
    time.sleep(2.1)
    resp = httpx.put(url, content=b"12345678")
    assert resp.status_code in (400, 403) and "AccessDenied" in resp.text
    assert store.head("runs/x/r0/s0/act/h4") is None


def test_server_side_copy_of_a_large_object_and_of_a_missing_one(store):
    data = os.urandom(9 << 20)  # above boto3's 8 MB multipart threshold (rclone: no part ETags)
    store.put("copy/src", data)
    assert store.copy("copy/src", "copy/dst", len(data)) is True
    assert store.get("copy/dst", len(data)) == data
    assert store.copy("copy/nothing", "copy/x") is False and store.head("copy/x") is None


def test_list_and_gc_delete_prefix_keeps_listed_keys(store):
    assert store.list("runs/empty/") == []  # rclone omits KeyCount here
    for i in range(3):
        store.put(f"runs/gc/r1/s0/act/h{i}", b"x")
    store.put("runs/gc/r1/s0/state/keep", b"y")
    store.put("runs/gc/r2/s0/act/h9", b"z")
    n = store.delete_prefix("runs/gc/r1/", keep={"runs/gc/r1/s0/state/keep"})
    assert n == 3
    assert store.list("runs/gc/r1/") == ["runs/gc/r1/s0/state/keep"]
    assert store.list("runs/gc/r2/") == ["runs/gc/r2/s0/act/h9"]


def test_nonce_store_rejects_replays_and_remembers_flushed_nonces(tmp_path):
    from bridge.nonces import BufferedNonceStore
    path = tmp_path / "nonces.db"
    store = BufferedNonceStore(path, max_age=30.0)
    now = time.time_ns()
    old = now - int(3600 * 1e9)  # far outside the window: forgotten on reload
    assert store.check_and_store("alice", now) and store.check_and_store("alice", old)
    assert not store.check_and_store("alice", now)  # replay
    assert store.check_and_store("bob", now)  # same nonce, other hotkey
    assert store.flush() == 3 and store.flush() == 0
    assert store.check_and_store("carol", now)  # accepted but never flushed: lost in a crash
    store.close()
    again = BufferedNonceStore(path, max_age=30.0)
    assert not again.check_and_store("alice", now) and not again.check_and_store("bob", now)
    assert again.check_and_store("alice", old) and again.check_and_store("carol", now)
    assert len(again) == 4


def test_miner_transfer_moves_a_large_object_both_ways_and_keeps_its_caps(store):
    from neurons.transfer import ObjectTransfer, TransferError
    data = os.urandom((3 << 20) + 12345)
    t = ObjectTransfer()
    try:
        t.put(store.presign_put("big/obj", len(data), 30), data)
        assert store.head("big/obj") == len(data)
        url = store.presign_get("big/obj", 30)
        assert t.get(url, max_bytes=len(data)) == data
        with pytest.raises(TransferError, match="more than"):
            t.get(url, max_bytes=len(data) - 1)
        assert t.get_verified(url, hashlib.sha256(data).hexdigest(), len(data)) == data  # the pool still works
        with pytest.raises(TransferError, match="HTTP 403"):  # signed for another length: refused
            t.put(store.presign_put("big/other", len(data) + 1, 30), data)
        assert store.head("big/other") is None
    finally:
        t.close()
