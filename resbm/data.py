"""Deterministic offline token data: sample id -> batch is a pure function of (run seed, sample id).

The assets (built by `scripts/prepare_data.py`) are uint16 token arrays per split, document
offsets, a byte-level BPE tokenizer and a manifest with the sha256 of every file. They are
memory-mapped lazily and their hashes verified once per process on first use. The asset folder is
`resbm/assets/` unless the environment variable RESBM_DATA_DIR (or a `data_dir` argument) names
another. Runtime needs only numpy and torch; `tokenizers` is optional, for `decode_tokens`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATA_DIR_ENV",
    "SPLITS",
    "VOCAB_SIZE",
    "DataError",
    "TokenData",
    "batch",
    "decode_tokens",
    "default_data_dir",
    "load",
    "validation_batches",
]

log = logging.getLogger(__name__)

VOCAB_SIZE = 4096
SPLITS = ("train", "val")
DATA_DIR_ENV = "RESBM_DATA_DIR"
_MANIFEST = "manifest.json"
_MANIFEST_MAX_BYTES = 4 << 20
_U64 = 2**64
_DOMAIN = b"resbm-data/v1"


class DataError(ValueError):
    """Bad arguments or assets that fail their manifest check."""


def default_data_dir() -> Path:
    """The asset folder: $RESBM_DATA_DIR if set, else the package's assets/."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "assets"


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= int(value) < hi:
        raise DataError(f"{name} must be in [{lo}, {hi}), got {value}")
    return int(value)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class TokenData:
    """The prepared token arrays of one asset folder, verified once and memory-mapped."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._manifest: dict | None = None
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def manifest(self) -> dict:
        """The parsed manifest, after every file's sha256 and size has been checked."""
        with self._lock:
            if self._manifest is None:
                self._manifest = self._verify()
            return self._manifest

    def _verify(self) -> dict:
        path = self.root / _MANIFEST
        if not path.is_file():
            raise DataError(f"no {_MANIFEST} in {self.root}: run scripts/prepare_data.py "
                            f"or point {DATA_DIR_ENV} at a prepared asset folder")
        if path.stat().st_size > _MANIFEST_MAX_BYTES:
            raise DataError(f"{path} is larger than {_MANIFEST_MAX_BYTES} bytes")
        try:
            m = json.loads(path.read_text("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(m, dict) or m.get("format") != 1 or not isinstance(m.get("files"), dict):
            raise DataError(f"{path}: unsupported manifest (need format 1 with a 'files' table)")
        vocab = m.get("vocab_size")
        if isinstance(vocab, bool) or not isinstance(vocab, int) or not 0 < vocab <= 65536:
            raise DataError(f"{path}: vocab_size must be an int in 1..65536, got {vocab!r}")
        for split in SPLITS:
            for name in (f"{split}.npy", f"{split}_doc_offsets.npy"):
                if name not in m["files"]:
                    raise DataError(f"{path}: manifest lists no {name}")
        for name, info in sorted(m["files"].items()):
            f = self.root / name
            if Path(name).name != name or not f.is_file():
                raise DataError(f"asset {name!r} listed in the manifest is missing from {self.root}")
            size = f.stat().st_size
            if size != info.get("bytes"):
                raise DataError(f"asset {name}: {size} bytes, manifest says {info.get('bytes')}")
            digest = _sha256_file(f)
            if digest != info.get("sha256"):
                raise DataError(f"asset {name}: sha256 {digest[:16]}..., manifest says "
                                f"{str(info.get('sha256'))[:16]}... (corrupted or stale)")
        log.info("verified %d data assets in %s (vocab %d)", len(m["files"]), self.root, vocab)
        return m

    @property
    def vocab_size(self) -> int:
        """Vocabulary size recorded in the manifest."""
        return int(self.manifest["vocab_size"])

    def tokens(self, split: str) -> np.ndarray:
        """Read-only memory map of a split's uint16 token stream."""
        return self._array(split, f"{split}.npy", np.uint16)

    def doc_offsets(self, split: str) -> np.ndarray:
        """Document start offsets into `tokens(split)`, with the total length appended."""
        return self._array(split, f"{split}_doc_offsets.npy", np.int64)

    def _array(self, split: str, name: str, dtype: type) -> np.ndarray:
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        self.manifest  # noqa: B018 - verify before the first map
        with self._lock:
            if name not in self._arrays:
                arr = np.load(self.root / name, mmap_mode="r", allow_pickle=False)
                if arr.dtype != dtype or arr.ndim != 1:
                    raise DataError(f"asset {name}: expected 1-D {np.dtype(dtype)}, got {arr.ndim}-D {arr.dtype}")
                self._arrays[name] = arr
            return self._arrays[name]

    def _windows(self, split: str, offsets: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        arr = self.tokens(split)
        idx = offsets[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]
        win = torch.from_numpy(arr[idx].astype(np.int64))
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def _check_seq(self, split: str, batch_size: int, seq_len: int) -> int:
        _check_int("batch_size", batch_size, 1, 1 << 20)
        n = int(self.tokens(split).size)
        _check_int("seq_len", seq_len, 1, n)  # a window needs seq_len + 1 tokens
        return n

    def batch(self, run_seed: int, sample_id: int, batch_size: int, seq_len: int,
              split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, targets) int64 [B, T] for one sample: a pure function of the arguments."""
        seed = _check_int("run_seed", run_seed, 0, _U64)
        sid = _check_int("sample_id", sample_id, 0, _U64)
        n = self._check_seq(split, batch_size, seq_len)
        span = n - seq_len  # window starts in [0, n - seq_len - 1]
        head = _DOMAIN + split.encode() + struct.pack("<QQ", seed, sid)
        offsets = np.empty(batch_size, dtype=np.int64)
        for row in range(batch_size):
            h = hashlib.sha256(head + struct.pack("<Q", row)).digest()
            offsets[row] = int.from_bytes(h[:8], "little") % span  # bias < span / 2**64
        return self._windows(split, offsets, seq_len)

    def validation_batches(self, n: int, batch_size: int,
                           seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed list of n validation batches: windows evenly spaced over the val split."""
        _check_int("n", n, 1, 1 << 20)
        total = self._check_seq("val", batch_size, seq_len)
        count = n * batch_size
        last = total - seq_len - 1
        if count * (seq_len + 1) > total:
            log.warning("val split (%d tokens) too small for %d disjoint windows of %d: they overlap",
                        total, count, seq_len + 1)
        offsets = (np.arange(count, dtype=np.int64) * last) // max(count - 1, 1)
        return [self._windows("val", offsets[i * batch_size:(i + 1) * batch_size], seq_len)
                for i in range(n)]


_CACHE: dict[Path, TokenData] = {}
_CACHE_LOCK = threading.Lock()


def load(data_dir: str | os.PathLike[str] | None = None) -> TokenData:
    """The shared TokenData for a folder (default: `default_data_dir()`), verified on first use."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    key = root.resolve()
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = TokenData(key)
        return _CACHE[key]


def _checked(data_dir: str | os.PathLike[str] | None) -> TokenData:
    td = load(data_dir)
    if data_dir is None and os.environ.get(DATA_DIR_ENV) is None and td.vocab_size != VOCAB_SIZE:
        raise DataError(f"packaged assets have vocab {td.vocab_size}, VOCAB_SIZE is {VOCAB_SIZE}")
    return td


def batch(run_seed: int, sample_id: int, batch_size: int, seq_len: int, split: str = "train",
          data_dir: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) int64 [B, T], targets = tokens shifted by one; pure in its arguments."""
    return _checked(data_dir).batch(run_seed, sample_id, batch_size, seq_len, split)


def validation_batches(n: int, batch_size: int, seq_len: int,
                       data_dir: str | os.PathLike[str] | None = None
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: n batches of (tokens, targets) from the held-out documents."""
    return _checked(data_dir).validation_batches(n, batch_size, seq_len)


def decode_tokens(ids: "list[int] | np.ndarray | torch.Tensor",
                  data_dir: str | os.PathLike[str] | None = None) -> str:
    """Token ids -> text with the prepared tokenizer (needs the optional `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("decode_tokens needs the optional 'tokenizers' package") from None
    td = load(data_dir)
    flat = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
    bad = [i for i in flat if not 0 <= i < td.vocab_size]
    if bad:
        raise DataError(f"token ids must be in [0, {td.vocab_size}), got {bad[:5]}")
    tok = Tokenizer.from_file(str(td.root / "tokenizer.json"))
    return tok.decode(flat, skip_special_tokens=False)
