"""Where a dataset's files come from: a local folder read in place, or a remote Source (HTTP, given by
the caller: resbm does no network I/O) into a verified, size-bounded disk cache (files named by their sha256, least recently used evicted first).

Every file is checked against the manifest's size and sha256 before it is used: once per process
for a local or cached file, while downloading for a fetched one. A corrupt cached file is deleted
and fetched again; a source that keeps serving wrong bytes gets a clear DataError.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from pathlib import Path
from typing import Callable, Protocol

__all__ = [
    "CACHE_BYTES_ENV",
    "CACHE_DIR_ENV",
    "DataError",
    "LocalSource",
    "ShardCache",
    "Source",
    "SourceFactory",
    "default_cache",
    "sha256_file",
]

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "RESBM_DATA_CACHE"
CACHE_BYTES_ENV = "RESBM_DATA_CACHE_GB"
_DEFAULT_CACHE_GB = 50.0
_CHUNK = 1 << 20


class DataError(Exception):
    """Bad arguments, or data that is missing or fails its manifest check.

    Not a ValueError on purpose: code that treats ValueError as "the peer sent bad input" (the
    validator's replay) must not blame a miner for our own unreadable data."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class Source(Protocol):
    """Somewhere a dataset's files can be read from."""

    def describe(self, name: str) -> str:
        """Human-readable location of `name` (for error messages)."""

    def fetch_to(self, name: str, dest: Path) -> None:
        """Write the file `name` to `dest` (raises DataError if it cannot)."""

    def get_bytes(self, name: str, limit: int) -> bytes:
        """The whole (small) file, at most `limit` bytes."""


SourceFactory = Callable[[str], Source]
"""Makes the Source of files under a base URL (neurons.dataset_http.HttpSource: resbm does no network I/O)."""


class LocalSource:
    """A dataset folder on this machine: files are read in place, never copied."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def describe(self, name: str) -> str:
        """The file's path."""
        return str(self.root / name)

    def path(self, name: str) -> Path:
        """The file's path (DataError if it is missing)."""
        p = self.root / name
        if not p.is_file():
            raise DataError(f"dataset file {name!r} listed in the manifest is missing from {self.root}")
        return p

    def get_bytes(self, name: str, limit: int) -> bytes:
        """The whole (small) file, at most `limit` bytes."""
        p = self.path(name)
        if p.stat().st_size > limit:
            raise DataError(f"{p}: {p.stat().st_size} bytes, more than the {limit} allowed")
        return p.read_bytes()

    def fetch_to(self, name: str, dest: Path) -> None:
        """Copy the file to `dest`."""
        with open(self.path(name), "rb") as src, open(dest, "wb") as out:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                out.write(chunk)


class ShardCache:
    """Verified dataset files on disk, named by sha256, at most `max_bytes` in all (LRU eviction)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int, attempts: int = 2) -> None:
        if max_bytes <= 0:
            raise DataError(f"cache size must be positive, got {max_bytes} bytes")
        self.root = Path(root)
        self.max_bytes, self.attempts = max_bytes, attempts
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}
        self._verified: dict[str, tuple[int, int]] = {}  # sha -> (size, mtime_ns) when last hashed
        self.fetched_bytes = 0

    def _path(self, sha: str) -> Path:
        return self.root / f"{sha}.bin"

    def _file_lock(self, sha: str) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(sha, threading.Lock())

    def cached(self, sha: str) -> bool:
        """Whether a file with this sha256 is on disk (not yet necessarily verified)."""
        return self._path(sha).is_file()

    def get(self, name: str, size: int, sha: str, source: Source) -> Path:
        """Path of the verified file; fetched from `source` (and older files evicted) if needed."""
        path = self._path(sha)
        with self._file_lock(sha):
            if path.is_file():
                st = path.stat()
                if self._verified.get(sha) == (st.st_size, st.st_mtime_ns) or (
                        st.st_size == size and sha256_file(path) == sha):
                    os.utime(path)  # most recently used
                    st = path.stat()
                    self._verified[sha] = (st.st_size, st.st_mtime_ns)
                    return path
                log.warning("cached %s (%s) is corrupt: deleting it and fetching it again", name, path)
                path.unlink(missing_ok=True)
                self._verified.pop(sha, None)
            self._fetch(name, size, sha, source, path)
            st = path.stat()
            self._verified[sha] = (st.st_size, st.st_mtime_ns)
            return path

    def _fetch(self, name: str, size: int, sha: str, source: Source, path: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_room(size, keep=path)
        tmp = self.root / f".partial-{sha[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            for attempt in range(self.attempts):
                source.fetch_to(name, tmp)
                got_size = tmp.stat().st_size
                got = sha256_file(tmp) if got_size == size else None
                if got == sha:
                    os.replace(tmp, path)
                    self.fetched_bytes += size
                    return
                what = (f"{got_size} bytes, manifest says {size}" if got is None
                        else f"sha256 {got[:16]}..., manifest says {sha[:16]}...")
                log.warning("%s from %s: %s (attempt %d)", name, source.describe(name), what, attempt + 1)
            raise DataError(f"dataset file {name} from {source.describe(name)}: {what}; the source is "
                            "corrupt or tampered with: nothing was used (re-upload it with "
                            "scripts/prepare_dataset.py)")
        finally:
            tmp.unlink(missing_ok=True)

    def _make_room(self, size: int, keep: Path) -> None:
        if size > self.max_bytes:
            raise DataError(f"a {size}-byte dataset file does not fit the {self.max_bytes}-byte cache: "
                            f"raise {CACHE_BYTES_ENV}")
        with self._lock:
            files = []
            for p in self.root.glob("*.bin"):
                try:
                    st = p.stat()
                except FileNotFoundError:  # another process evicted it
                    continue
                files.append((st.st_mtime_ns, st.st_size, p))
            total = sum(s for _, s, _ in files)
            for _, s, p in sorted(files):
                if total + size <= self.max_bytes:
                    break
                if p != keep:
                    p.unlink(missing_ok=True)  # an open memory map keeps its pages
                    self._verified.pop(p.stem, None)
                    total -= s
                    log.info("evicted %s from the data cache (%d bytes)", p.name, s)

    def usage(self) -> int:
        """Bytes the cache holds now."""
        return sum(p.stat().st_size for p in self.root.glob("*.bin")) if self.root.is_dir() else 0


def default_cache() -> ShardCache:
    """The cache at $RESBM_DATA_CACHE (default ~/.cache/resbm/data), $RESBM_DATA_CACHE_GB big (default 50)."""
    root = os.environ.get(CACHE_DIR_ENV) or str(Path.home() / ".cache" / "resbm" / "data")
    raw = os.environ.get(CACHE_BYTES_ENV, str(_DEFAULT_CACHE_GB))
    try:
        gb = float(raw)
    except ValueError:
        raise DataError(f"{CACHE_BYTES_ENV}={raw!r} is not a number of gigabytes (e.g. 50)") from None
    if not gb > 0:
        raise DataError(f"{CACHE_BYTES_ENV}={raw!r} must be a positive number of gigabytes")
    return ShardCache(root, int(gb * 1e9))
