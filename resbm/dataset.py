"""A dataset named by its manifest: (data seed, sample id) -> tokens, fetching only the shards used.

Sampling is a pure function of the manifest: row r of sample `id` under seed `s` starts at
sha256(domain, split, s, id, r) mod (the split's window starts), counted over its shards in
manifest order (a window never crosses a shard). Every participant with the same manifest reads
the same tokens. Shards are verified against their sha256 before use, memory-mapped, and the
shards of the next samples are fetched in the background while the current one is used.
"""
from __future__ import annotations

import bisect
import hashlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from resbm.dataset_store import (DataError, LocalSource, ShardCache, Source, SourceFactory, default_cache,
                                 sha256_file)
from spec.dataset import DatasetManifest, DatasetRef, ManifestError, ShardEntry, parse_manifest

__all__ = ["PREFETCH_SAMPLES", "Dataset", "DataError", "forget_dataset", "open_dataset",
           "open_local", "window_positions"]

log = logging.getLogger(__name__)

PREFETCH_SAMPLES = 8
_U64 = 2**64
_DOMAIN = b"resbm-data/v1"
_OPEN_MAPS = 64


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= int(value) < hi:
        raise DataError(f"{name} must be in [{lo}, {hi}), got {value}")
    return int(value)


def window_positions(seed: int, sample_id: int, batch_size: int, split: str, span: int) -> list[int]:
    """Row start positions in [0, span) of one sample: pure in its arguments."""
    head = _DOMAIN + split.encode() + struct.pack("<QQ", seed, sample_id)
    return [int.from_bytes(hashlib.sha256(head + struct.pack("<Q", r)).digest()[:8], "little") % span
            for r in range(batch_size)]  # bias < span / 2**64


class Dataset:
    """One manifest's tokens; `source` gives its files, `cache` holds fetched ones (None: read in place)."""

    def __init__(self, manifest: DatasetManifest, source: Source,
                 cache: ShardCache | None, where: str, prefetch_samples: int = PREFETCH_SAMPLES) -> None:
        if cache is None and not isinstance(source, LocalSource):
            raise DataError("a remote dataset needs a cache")
        self.manifest, self.source, self.cache, self.where = manifest, source, cache, where
        self.prefetch_samples = prefetch_samples
        self._lock = threading.Lock()
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()
        self._verified_local: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: dict[str, Future] = {}

    @property
    def name(self) -> str:
        """The manifest's dataset name."""
        return self.manifest.name

    @property
    def vocab_size(self) -> int:
        """Vocabulary size recorded in the manifest."""
        return self.manifest.vocab_size

    def __repr__(self) -> str:
        return f"Dataset({self.name!r} at {self.where}, vocab {self.vocab_size})"

    # ----- files -----
    def file_path(self, name: str) -> Path:
        """Local path of a verified dataset file (tokenizer or shard), fetching it if needed."""
        entry = self.manifest.file(name)
        if self.cache is not None:
            return self.cache.get(entry.name, entry.bytes, entry.sha256, self.source)
        path = self.source.path(name)
        if name not in self._verified_local:
            size = path.stat().st_size
            if size != entry.bytes:
                raise DataError(f"dataset file {name}: {size} bytes, manifest says {entry.bytes} ({path})")
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise DataError(f"dataset file {name}: sha256 {digest[:16]}..., manifest says "
                                f"{entry.sha256[:16]}... (corrupted or stale: rebuild {self.where})")
            self._verified_local.add(name)
        return path

    def _shard(self, entry: ShardEntry) -> np.ndarray:
        with self._lock:
            arr = self._maps.get(entry.name)
            if arr is not None:
                self._maps.move_to_end(entry.name)
                return arr
        fut = self._inflight.pop(entry.name, None)
        path = None
        if fut is not None:
            try:
                path = fut.result()
            except DataError:  # fetched again below, so the error names this read
                path = None
        path = path or self.file_path(entry.name)
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.dtype != np.dtype(self.manifest.token_dtype) or arr.shape != (entry.tokens,):
            raise DataError(f"shard {entry.name}: {arr.shape} {arr.dtype}, manifest says "
                            f"({entry.tokens},) {self.manifest.token_dtype}")
        with self._lock:
            self._maps[entry.name] = arr
            while len(self._maps) > _OPEN_MAPS:
                self._maps.popitem(last=False)
        return arr

    # ----- sampling -----
    def _layout(self, split: str, seq_len: int) -> tuple[list[ShardEntry], list[int], int]:
        try:
            shards = self.manifest.split_shards(split)
        except ManifestError as exc:
            raise DataError(str(exc)) from None
        _check_int("seq_len", seq_len, 1, 1 << 24)
        spans = [max(0, s.tokens - seq_len) for s in shards]  # a window needs seq_len + 1 tokens
        total = sum(spans)
        if total == 0:
            raise DataError(f"seq_len {seq_len} is too long: every {split} shard of {self.name} has "
                            f"at most {max(s.tokens for s in shards)} tokens")
        ends = list(np.cumsum(spans))
        return shards, ends, total

    @staticmethod
    def _locate(ends: list[int], pos: int) -> tuple[int, int]:
        i = bisect.bisect_right(ends, pos)
        return i, pos - (ends[i - 1] if i else 0)

    def _read(self, shards: list[ShardEntry], ends: list[int], positions: list[int],
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.empty((len(positions), seq_len + 1), dtype=np.int64)
        for r, pos in enumerate(positions):
            i, off = self._locate(ends, pos)
            rows[r] = self._shard(shards[i])[off:off + seq_len + 1]
        win = torch.from_numpy(rows)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def shards_for(self, run_seed: int, sample_id: int, batch_size: int, seq_len: int,
                   split: str = "train") -> list[str]:
        """Names of the shards one sample reads (pure; nothing is fetched)."""
        shards, ends, total = self._layout(split, seq_len)
        pos = window_positions(run_seed, sample_id, batch_size, split, total)
        return sorted({shards[self._locate(ends, p)[0]].name for p in pos})

    def batch(self, run_seed: int, sample_id: int, batch_size: int, seq_len: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) int64 [B, T] for one sample: a pure function of the manifest and arguments."""
        seed = _check_int("run_seed", run_seed, 0, _U64)
        sid = _check_int("sample_id", sample_id, 0, _U64)
        _check_int("batch_size", batch_size, 1, 1 << 20)
        shards, ends, total = self._layout(split, seq_len)
        if self.cache is not None and self.prefetch_samples:
            self.prefetch(seed, range(sid + 1, min(sid + 1 + self.prefetch_samples, _U64)), batch_size,
                          seq_len, split)
        return self._read(shards, ends, window_positions(seed, sid, batch_size, split, total), seq_len)

    def validation_batches(self, n: int, batch_size: int, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of n validation batches: windows evenly spaced over the val split."""
        _check_int("n", n, 1, 1 << 20)
        _check_int("batch_size", batch_size, 1, 1 << 20)
        shards, ends, total = self._layout("val", seq_len)
        count = n * batch_size
        if count * (seq_len + 1) > self.manifest.split_tokens("val"):
            log.warning("val split (%d tokens) too small for %d disjoint windows of %d: they overlap",
                        self.manifest.split_tokens("val"), count, seq_len + 1)
        pos = [int(v) for v in (np.arange(count, dtype=np.int64) * (total - 1)) // max(count - 1, 1)]
        return [self._read(shards, ends, pos[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n)]

    def tokens(self, split: str) -> np.ndarray:
        """The whole split as one array (a memory map when it is one shard); for tools and tests."""
        parts = [self._shard(s) for s in self.manifest.split_shards(split)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # ----- prefetch -----
    def prefetch(self, run_seed: int, sample_ids, batch_size: int, seq_len: int,
                 split: str = "train") -> list[Future]:
        """Fetch (in the background) the shards these samples read that are not cached yet."""
        if self.cache is None:
            return []
        wanted: list[str] = []
        for sid in sample_ids:
            wanted += [n for n in self.shards_for(run_seed, sid, batch_size, seq_len, split) if n not in wanted]
        futures = []
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="data-prefetch")
            for name in wanted:
                if name in self._maps or (name in self._inflight and not self._inflight[name].done()):
                    continue
                entry = self.manifest.file(name)
                if self.cache.cached(entry.sha256) and name not in self._inflight:
                    continue
                fut = self._pool.submit(self.file_path, name)
                fut.add_done_callback(lambda f, n=name: self._log_failed(n, f))
                self._inflight[name] = fut
                futures.append(fut)
        return futures

    def _log_failed(self, name: str, fut: Future) -> None:
        if fut.exception() is not None:
            log.warning("prefetching %s failed: %s", name, fut.exception())


# ----- opening datasets -----
_OPEN: dict[str, Dataset] = {}
_OPEN_LOCK = threading.Lock()


def open_local(root: str | os.PathLike[str]) -> Dataset:
    """The dataset in a local folder (read in place, verified on first use); shared per folder."""
    root = Path(root).resolve()
    key = f"local:{root}"
    with _OPEN_LOCK:
        if key in _OPEN:
            return _OPEN[key]
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"no manifest.json in {root}: build one with scripts/prepare_dataset.py")
    try:
        manifest = parse_manifest(path.read_bytes(), where=str(path))
    except ManifestError as exc:
        raise DataError(str(exc)) from None
    ds = Dataset(manifest, LocalSource(root), None, str(root))
    with _OPEN_LOCK:
        return _OPEN.setdefault(key, ds)


def open_dataset(ref: DatasetRef, files_url: str | None = None, cache: ShardCache | None = None,
                 remote: SourceFactory | None = None) -> Dataset:
    """The dataset a run config names: its manifest fetched (or read from the cache) and verified.

    `remote` makes the Source for a base URL (neurons.dataset_http.HttpSource). A bucket-key
    manifest is fetched from `files_url`, the URL that serves the run's bucket files (the bridge's:
    `protocol.bridge_client.BridgeClient.dataset_url`); once opened, the dataset is shared by its
    manifest sha256 (which pins every byte), so later calls need neither.
    """
    with _OPEN_LOCK:
        ds = _OPEN.get(ref.sha256)
    if ds is not None:
        if files_url is not None and remote is not None and not ref.is_url:
            ds.source = remote(files_url)
        return ds
    if not ref.is_url and files_url is None:
        raise DataError(f"dataset {ref.manifest} is a key in the bridge's bucket: open it with the URL "
                        "that serves the bucket's files first (resbm.dataset.open_dataset(ref, files_url=...))")
    if remote is None:
        raise DataError(f"dataset {ref.manifest} is remote: open it with an HTTP source "
                        "(open_dataset(ref, ..., remote=neurons.dataset_http.HttpSource))")
    if ref.is_url:
        source = remote(ref.manifest.rsplit("/", 1)[0] + "/")
        manifest_name = ref.manifest.rsplit("/", 1)[1]
    else:
        source, manifest_name = remote(files_url), "manifest.json"
    cache = cache or default_cache()
    cached = cache.root / f"{ref.sha256}.json"
    raw = cached.read_bytes() if cached.is_file() else source.get_bytes(manifest_name, 16 << 20)
    try:
        manifest = parse_manifest(raw, ref.sha256, where=source.describe(manifest_name))
    except ManifestError as exc:
        if cached.is_file():
            cached.unlink(missing_ok=True)
        raise DataError(str(exc)) from None
    if not cached.is_file():
        cache.root.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_bytes(raw)
        os.replace(tmp, cached)
    ds = Dataset(manifest, source, cache, source.describe(manifest_name))
    with _OPEN_LOCK:
        return _OPEN.setdefault(ref.sha256, ds)


def forget_dataset(sha256: str) -> None:
    """Drop the shared Dataset of a manifest: the next open_dataset re-reads it with the current cache."""
    with _OPEN_LOCK:
        _OPEN.pop(sha256, None)
