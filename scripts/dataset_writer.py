"""Token shards + manifest writer shared by prepare_dataset, prepare_data and prepare_bench_corpus.

Documents are tokenized in order, each followed by the end-of-text id, and cut into `.npy`
shards of `shard_tokens` tokens per split. Same documents and tokenizer give the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable

import numpy as np

__all__ = ["EOT", "ShardWriter", "train_tokenizer", "write_dataset", "write_manifest"]

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None):
    """A byte-level BPE of `vocab_size` (EOT as its only special token) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return tok


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ShardWriter:
    """Appends token arrays of one split and writes a `{split}-NNNNN.npy` shard every `shard_tokens`."""

    def __init__(self, out: Path, split: str, dtype: str, shard_tokens: int) -> None:
        if shard_tokens < 2:
            raise SystemExit(f"--shard-tokens must be >= 2, got {shard_tokens}")
        self.out, self.split, self.dtype, self.shard_tokens = out, split, np.dtype(dtype), shard_tokens
        self._buf: list[np.ndarray] = []
        self._held = 0
        self.shards: list[dict] = []
        self.tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Append one document's ids."""
        self._buf.append(ids.astype(self.dtype, copy=False))
        self._held += ids.size
        self.tokens += ids.size
        while self._held >= self.shard_tokens:
            flat = np.concatenate(self._buf)
            self._write(flat[:self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self._buf, self._held = ([rest] if rest.size else []), rest.size

    def close(self) -> list[dict]:
        """Write the last partial shard; returns the shard entries."""
        if self._held:
            self._write(np.concatenate(self._buf))
        self._buf, self._held = [], 0
        if not self.shards:
            raise SystemExit(f"the {self.split} split is empty: give more documents or a larger --val-fraction")
        return self.shards

    def _write(self, arr: np.ndarray) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"
        path = self.out / name
        np.save(path, np.ascontiguousarray(arr), allow_pickle=False)
        self.shards.append({"name": name, "split": self.split, "tokens": int(arr.size),
                            "bytes": path.stat().st_size, "sha256": _sha256(path)})


def write_manifest(out: Path, name: str, tok_file: str, vocab_size: int, eot_id: int | None,
                   dtype: str, shards: list[dict], info: dict) -> dict:
    """Write `out/manifest.json` (sorted keys: deterministic) and return it."""
    tok = out / tok_file
    manifest = {
        "format": 2, "name": name, "vocab_size": vocab_size, "eot_id": eot_id, "token_dtype": dtype,
        "tokenizer": {"name": tok_file, "bytes": tok.stat().st_size, "sha256": _sha256(tok)},
        "shards": shards, "info": info,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def write_dataset(tok, docs: dict[str, Iterable[tuple[str, str]]], out: Path, name: str,
                  shard_tokens: int, info: dict, total: dict[str, int] | None = None,
                  batch: int = 64) -> dict:
    """Tokenize {split: [(doc_id, text)]} into shards under `out`, save the tokenizer, write the manifest."""
    from tqdm import tqdm

    eot_id = tok.token_to_id(EOT)
    vocab = tok.get_vocab_size()
    dtype = "uint16" if vocab <= 1 << 16 else "uint32"
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"), pretty=False)
    shards, counts = [], {}
    for split in ("train", "val"):
        writer, n_docs = ShardWriter(out, split, dtype, shard_tokens), 0
        bar = tqdm(total=(total or {}).get(split), desc=f"tokenize {split}", unit="doc", file=sys.stderr,
                   mininterval=2.0)
        pending: list[str] = []

        def flush() -> None:
            for enc in tok.encode_batch(pending):
                writer.add(np.asarray(enc.ids + ([eot_id] if eot_id is not None else []), dtype=np.int64))
            bar.update(len(pending))
            pending.clear()

        for _, text in docs[split]:
            pending.append(text)
            n_docs += 1
            if len(pending) >= batch:
                flush()
        flush()
        bar.close()
        shards += writer.close()
        counts[split] = {"documents": n_docs, "tokens": writer.tokens}
    return write_manifest(out, name, "tokenizer.json", vocab, eot_id, dtype, shards, {**info, "splits": counts})
