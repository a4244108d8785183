"""Dataset manifests, sharded sampling, the verified size-bounded cache and prefetch, over a real
HTTP server on 127.0.0.1 (the folder served as a bucket would serve it)."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from spec.dataset import DatasetRef, ManifestError, parse_manifest
from protocol.run_config import RunConfig
from resbm import data
from resbm.dataset import Dataset, forget_dataset, open_dataset
from neurons.dataset_http import HttpSource
from resbm.dataset_store import DataError, ShardCache
from scripts.bench_data import serve_folder
from scripts.dataset_writer import ShardWriter, write_manifest


def make_dataset(root, shard_tokens: int = 500, train: int = 3000, val: int = 700, vocab: int = 97):
    """A synthetic dataset folder: token i of the stream is i % vocab, so positions are checkable."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text('{"stub": true}')
    shards = []
    for split, n in (("train", train), ("val", val)):
        w = ShardWriter(root, split, "uint16", shard_tokens)
        w.add(np.arange(n, dtype=np.int64) % vocab + (0 if split == "train" else 1))
        shards += w.close()
    write_manifest(root, "synthetic", "tokenizer.json", vocab + 1, 0, "uint16", shards, {})
    raw = (root / "manifest.json").read_bytes()
    return DatasetRef(manifest="x/manifest.json", sha256=hashlib.sha256(raw).hexdigest()), raw


@pytest.fixture()
def served(tmp_path):
    ref, raw = make_dataset(tmp_path / "ds")
    srv, base = serve_folder(tmp_path / "ds")
    yield dict(root=tmp_path / "ds", base=base, manifest=parse_manifest(raw, ref.sha256), raw=raw,
               ref=DatasetRef(manifest=base + "manifest.json", sha256=ref.sha256))
    srv.shutdown()


def remote(served, cache_dir, max_bytes=10**9, prefetch=0) -> Dataset:
    return Dataset(served["manifest"], HttpSource(served["base"]), ShardCache(cache_dir, max_bytes),
                   served["base"], prefetch_samples=prefetch)


def test_remote_and_local_read_identical_tokens_and_windows_stay_inside_one_shard(served, tmp_path):
    local = data.load(served["root"])
    far = remote(served, tmp_path / "cache")
    for sid in range(40):
        a, b = local.batch(5, sid, 4, 32), far.batch(5, sid, 4, 32)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(a[0][:, 1:], a[1][:, :-1])
        # the synthetic stream counts up mod vocab: a window that crossed a shard boundary would still
        # count up, so check positions instead: every row is a contiguous run of the stream
        steps = (a[0][:, 1:] - a[0][:, :-1]) % 97
        assert bool((steps == 1).all())
    assert torch.equal(local.validation_batches(2, 3, 16)[1][0], far.validation_batches(2, 3, 16)[1][0])


def test_only_the_needed_shards_are_fetched_and_verified(served, tmp_path):
    ds = remote(served, tmp_path / "cache")
    need = ds.shards_for(1, 7, 2, 32)
    ds.batch(1, 7, 2, 32)
    cached = {p.stem for p in (tmp_path / "cache").glob("*.bin")}
    assert cached == {served["manifest"].file(n).sha256 for n in need}
    assert len(cached) < len(served["manifest"].split_shards("train"))


def test_prefetch_fetches_the_next_samples_shards_in_the_background(served, tmp_path):
    ds = remote(served, tmp_path / "cache", prefetch=8)
    ds.batch(2, 0, 2, 32)
    want = {n for sid in range(1, 9) for n in ds.shards_for(2, sid, 2, 32)}
    for fut in list(ds._inflight.values()):
        fut.result(timeout=30)
    cached = {p.stem for p in (tmp_path / "cache").glob("*.bin")}
    assert {served["manifest"].file(n).sha256 for n in want} <= cached


def test_a_corrupt_cached_shard_is_fetched_again_and_the_tokens_are_right(served, tmp_path):
    ds = remote(served, tmp_path / "cache")
    first = ds.batch(3, 1, 2, 32)[0]
    for p in (tmp_path / "cache").glob("*.bin"):
        raw = bytearray(p.read_bytes())
        raw[-1] ^= 0xFF
        p.write_bytes(bytes(raw))
    again = remote(served, tmp_path / "cache")  # a new process: verifies what it finds
    assert torch.equal(again.batch(3, 1, 2, 32)[0], first)
    for p in (tmp_path / "cache").glob("*.bin"):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == p.stem


def test_a_tampered_or_missing_source_shard_is_a_clear_error_and_nothing_is_kept(served, tmp_path):
    ds = remote(served, tmp_path / "cache")
    name = ds.shards_for(4, 0, 1, 32)[0]
    raw = bytearray((served["root"] / name).read_bytes())
    raw[-1] ^= 0x01
    (served["root"] / name).write_bytes(bytes(raw))
    with pytest.raises(DataError, match=f"{name} from http.*corrupt or tampered"):
        ds.batch(4, 0, 1, 32)
    assert not list((tmp_path / "cache").glob("*.bin"))
    (served["root"] / name).unlink()
    with pytest.raises(DataError, match="HTTP 404"):
        remote(served, tmp_path / "c2").batch(4, 0, 1, 32)


def test_cache_stays_under_its_bound_by_evicting_least_recently_used(served, tmp_path):
    shard_bytes = served["manifest"].split_shards("train")[0].bytes
    ds = remote(served, tmp_path / "cache", max_bytes=2 * shard_bytes + 10)
    for sid in range(30):
        ds.batch(0, sid, 1, 16)
        assert ds.cache.usage() <= 2 * shard_bytes + 10
    tiny = remote(served, tmp_path / "c3", max_bytes=10)
    with pytest.raises(DataError, match="does not fit the 10-byte cache"):
        tiny.batch(0, 0, 1, 16)


def test_open_dataset_checks_the_manifest_sha256_and_caches_it(served, tmp_path, monkeypatch):
    monkeypatch.setenv("RESBM_DATA_CACHE", str(tmp_path / "cache"))
    bad = DatasetRef(manifest=served["ref"].manifest, sha256="0" * 64)
    with pytest.raises(DataError, match="sha256 .* but the run config says 000"):
        open_dataset(bad, remote=HttpSource)
    forget_dataset(served["ref"].sha256)
    with pytest.raises(DataError, match="open it with an HTTP source"):
        open_dataset(served["ref"])  # resbm does no network I/O of its own
    ds = open_dataset(served["ref"], remote=HttpSource)
    assert open_dataset(served["ref"]) is ds and ds.vocab_size == 98
    assert (tmp_path / "cache" / f"{served['ref'].sha256}.json").read_bytes() == served["raw"]
    key_ref = DatasetRef(manifest="datasets/x/manifest.json", sha256="1" * 64)
    with pytest.raises(DataError, match="open it with the URL that serves the bucket's files"):
        data.batch(0, 0, 1, 8, dataset=key_ref)
    forget_dataset(served["ref"].sha256)


def test_cache_size_setting_errors_are_one_line(monkeypatch):
    from resbm.dataset_store import default_cache

    monkeypatch.setenv("RESBM_DATA_CACHE_GB", "lots")
    with pytest.raises(DataError, match="RESBM_DATA_CACHE_GB='lots' is not a number"):
        default_cache()
    monkeypatch.setenv("RESBM_DATA_CACHE_GB", "-1")
    with pytest.raises(DataError, match="must be a positive"):
        default_cache()


@pytest.mark.parametrize("change,match", [
    (lambda m: m.update(format=1), "format 1"),
    (lambda m: m.update(vocab_size=70000), "does not fit uint16"),
    (lambda m: m.update(eot_id=99), "eot_id 99 is outside"),
    (lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), "unique"),
    (lambda m: m.update(shards=[s for s in m["shards"] if s["split"] == "train"]), "no shard in the 'val'"),
    (lambda m: m["shards"][0].update(name="../etc/passwd"), "shards.0.name"),
    (lambda m: m["shards"][0].update(bytes=10), "cannot hold"),
    (lambda m: m.update(surprise=1), "surprise"),
])
def test_bad_manifests_are_refused_with_the_field_named(tmp_path, change, match):
    _, raw = make_dataset(tmp_path / "ds")
    m = json.loads(raw)
    change(m)
    with pytest.raises(ManifestError, match=match):
        parse_manifest(json.dumps(m).encode())
    with pytest.raises(ManifestError, match="not valid JSON"):
        parse_manifest(b"\xff{")


def test_run_config_dataset_field_is_validated():
    base = dict(run_id="r", model={}, n_stages=1, batch_size=1, micro_batches_per_step=1, inner_steps_per_round=1,
                samples_per_round=1, muon_lr=0.1, adamw_lr=0.1, total_rounds=1, data_seed=0, init_seed=0)
    assert RunConfig.model_validate(base).dataset is None
    ok = RunConfig.model_validate(base | {"dataset": {"manifest": "datasets/a/manifest.json", "sha256": "a" * 64}})
    assert ok.dataset.manifest == "datasets/a/manifest.json" and not ok.dataset.is_url
    for bad in ({"manifest": "../x/manifest.json", "sha256": "a" * 64}, {"manifest": "a", "sha256": "xyz"},
                {"manifest": "https://h/m.json"}, {"manifest": "a//b", "sha256": "a" * 64}):
        with pytest.raises(ValueError):
            RunConfig.model_validate(base | {"dataset": bad})


def test_shipped_corpus_is_a_format_2_dataset_with_its_files_verified():
    ds = data.load()
    assert ds.manifest.format == 2 and ds.name == "resbm-small"
    for f in (ds.manifest.tokenizer, *ds.manifest.shards):
        path = ds.file_path(f.name)
        assert os.path.getsize(path) == f.bytes
