"""Deterministic token data: sample id -> batch is a pure function of (dataset manifest, seed, id).

A run names its dataset in the run config (`dataset`: manifest location + sha256); see
resbm.dataset for fetching, verifying and caching its shards. A run config without one trains on
the dataset shipped in `resbm/assets/` (built by `scripts/prepare_data.py`, the same manifest
format), or on the folder the environment variable RESBM_DATA_DIR (or a `data_dir` argument) names.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from resbm.dataset import Dataset, open_dataset, open_local
from resbm.dataset_store import DataError, SourceFactory
from spec.dataset import DEFAULT_VOCAB_SIZE, DatasetRef

__all__ = [
    "DATA_DIR_ENV",
    "SPLITS",
    "VOCAB_SIZE",
    "DataError",
    "Dataset",
    "batch",
    "decode_tokens",
    "default_data_dir",
    "load",
    "open_run_dataset",
    "validation_batches",
]

VOCAB_SIZE = DEFAULT_VOCAB_SIZE
"""Vocabulary of the shipped dataset (resbm/assets): the model default when a run names none."""
SPLITS = ("train", "val")
DATA_DIR_ENV = "RESBM_DATA_DIR"

DatasetArg = "Dataset | DatasetRef | None"


def default_data_dir() -> Path:
    """The local dataset folder: $RESBM_DATA_DIR if set, else the package's assets/."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent / "assets"


def load(data_dir: str | os.PathLike[str] | None = None) -> Dataset:
    """The shared Dataset of a local folder (default: `default_data_dir()`), verified on first use."""
    return open_local(data_dir if data_dir is not None else default_data_dir())


def open_run_dataset(ref: DatasetRef | None, files_url: str | None = None,
                     remote: SourceFactory | None = None) -> Dataset:
    """The dataset a run config's `dataset` names (None: the local default folder); `files_url`
    serves the run's bucket files and `remote` makes the HTTP source of a remote one (see
    resbm.dataset.open_dataset)."""
    return load() if ref is None else open_dataset(ref, files_url, remote=remote)


def _resolve(dataset: DatasetArg, data_dir: str | os.PathLike[str] | None) -> Dataset:
    if isinstance(dataset, Dataset):
        return dataset
    if dataset is not None:
        return open_dataset(dataset)
    ds = load(data_dir)
    if data_dir is None and os.environ.get(DATA_DIR_ENV) is None and ds.vocab_size != VOCAB_SIZE:
        raise DataError(f"packaged dataset has vocab {ds.vocab_size}, VOCAB_SIZE is {VOCAB_SIZE}")
    return ds


def batch(run_seed: int, sample_id: int, batch_size: int, seq_len: int, split: str = "train",
          data_dir: str | os.PathLike[str] | None = None, dataset: DatasetArg = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, targets) int64 [B, T], targets = tokens shifted by one; pure in its arguments."""
    return _resolve(dataset, data_dir).batch(run_seed, sample_id, batch_size, seq_len, split)


def validation_batches(n: int, batch_size: int, seq_len: int,
                       data_dir: str | os.PathLike[str] | None = None, dataset: DatasetArg = None
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed validation set: n batches of (tokens, targets) from the held-out documents."""
    return _resolve(dataset, data_dir).validation_batches(n, batch_size, seq_len)


def decode_tokens(ids: "list[int] | np.ndarray | torch.Tensor",
                  data_dir: str | os.PathLike[str] | None = None, dataset: DatasetArg = None) -> str:
    """Token ids -> text with the dataset's tokenizer (needs the optional `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ImportError("decode_tokens needs the optional 'tokenizers' package") from None
    ds = _resolve(dataset, data_dir)
    flat = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
    bad = [i for i in flat if not 0 <= i < ds.vocab_size]
    if bad:
        raise DataError(f"token ids must be in [0, {ds.vocab_size}), got {bad[:5]}")
    tok = Tokenizer.from_file(str(ds.file_path(ds.manifest.tokenizer.name)))
    return tok.decode(flat, skip_special_tokens=False)
