"""Dataset manifest (what a run trains on) and the run config's reference to it.

A dataset is a folder of files: `manifest.json`, the tokenizer (`tokenizer.json`) and token
shards (`.npy`, 1-D, `token_dtype`). The manifest lists every file with its size and sha256, so
the run config only has to name the manifest and its sha256: everything else is then pinned.
Pure pydantic, no torch: the bridge checks run configs with it, resbm.dataset reads shards with it.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "MANIFEST_FORMAT",
    "MANIFEST_MAX_BYTES",
    "SPLITS",
    "DatasetManifest",
    "DatasetRef",
    "FileEntry",
    "ManifestError",
    "ShardEntry",
    "parse_manifest",
]

DEFAULT_VOCAB_SIZE = 4096
"""Vocabulary of the dataset shipped in resbm/assets, which a run config without `dataset` trains on."""
MANIFEST_FORMAT = 2
MANIFEST_MAX_BYTES = 16 << 20
SPLITS = ("train", "val")
_DTYPE_MAX = {"uint16": 1 << 16, "uint32": 1 << 32}
_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SHA256 = r"^[0-9a-f]{64}$"


class ManifestError(ValueError):
    """A manifest that is not valid JSON, fails its sha256 or breaks a rule below."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_max_length=4096)


class FileEntry(_Strict):
    """One file of the dataset: its name inside the dataset folder, size and sha256."""

    name: str = Field(pattern=_FILE_NAME)
    bytes: int = Field(ge=1, le=1 << 40)
    sha256: str = Field(pattern=_SHA256)


class ShardEntry(FileEntry):
    """A token shard: a 1-D .npy array of `tokens` ids of the manifest's dtype, in one split."""

    split: Literal["train", "val"]
    tokens: int = Field(ge=1, le=1 << 40)


class DatasetManifest(_Strict):
    """Everything that pins a dataset: tokenizer, vocab, dtype and every shard's size and sha256."""

    format: Literal[2]
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    vocab_size: int = Field(ge=2, le=1 << 32)
    eot_id: int | None = Field(default=None, ge=0)
    token_dtype: Literal["uint16", "uint32"]
    tokenizer: FileEntry
    shards: list[ShardEntry] = Field(min_length=2, max_length=1_000_000)
    info: dict[str, Any] = Field(default_factory=dict, description="free-form provenance (sources, counts)")

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetManifest":
        if self.vocab_size > _DTYPE_MAX[self.token_dtype]:
            raise ValueError(f"vocab_size {self.vocab_size} does not fit {self.token_dtype}")
        if self.eot_id is not None and self.eot_id >= self.vocab_size:
            raise ValueError(f"eot_id {self.eot_id} is outside the vocab (size {self.vocab_size})")
        names = [self.tokenizer.name, "manifest.json", *(s.name for s in self.shards)]
        if len(set(names)) != len(names):
            raise ValueError("file names must be unique (and none may be manifest.json)")
        for split in SPLITS:
            if not any(s.split == split for s in self.shards):
                raise ValueError(f"no shard in the {split!r} split")
        itemsize = 2 if self.token_dtype == "uint16" else 4
        for s in self.shards:
            if s.bytes < s.tokens * itemsize:
                raise ValueError(f"shard {s.name}: {s.bytes} bytes cannot hold {s.tokens} {self.token_dtype} tokens")
        return self

    def split_shards(self, split: str) -> list[ShardEntry]:
        """The shards of one split, in manifest order (the order sampling counts them in)."""
        if split not in SPLITS:
            raise ManifestError(f"split must be one of {SPLITS}, got {split!r}")
        return [s for s in self.shards if s.split == split]

    def split_tokens(self, split: str) -> int:
        """Total tokens of a split."""
        return sum(s.tokens for s in self.split_shards(split))

    def file(self, name: str) -> FileEntry:
        """The entry (tokenizer or shard) named `name`; ManifestError if the manifest lists none."""
        for f in (self.tokenizer, *self.shards):
            if f.name == name:
                return f
        raise ManifestError(f"the manifest lists no file {name!r}")


class DatasetRef(_Strict):
    """The run config's `dataset`: where the manifest is and its sha256 (which pins every shard).

    `manifest` is an http(s) URL, or a key in the bridge's bucket (fetched through the bridge's
    `GET /v1/dataset/{file}`); shards and tokenizer sit next to the manifest.
    """

    manifest: str = Field(min_length=1, max_length=1024, pattern=r"^(https?://\S+|[A-Za-z0-9][A-Za-z0-9._/-]*)$")
    sha256: str = Field(pattern=_SHA256)

    @property
    def is_url(self) -> bool:
        """True when `manifest` is an http(s) URL rather than a bucket key."""
        return self.manifest.startswith(("http://", "https://"))

    @model_validator(mode="after")
    def _key_is_clean(self) -> "DatasetRef":
        if not self.is_url and any(p in ("", ".", "..") for p in self.manifest.split("/")):
            raise ValueError(f"manifest key {self.manifest!r} has an empty, '.' or '..' segment")
        return self


def parse_manifest(raw: bytes, sha256: str | None = None, where: str = "manifest") -> DatasetManifest:
    """Bytes -> DatasetManifest, after checking their sha256 (when given), size and every rule."""
    if len(raw) > MANIFEST_MAX_BYTES:
        raise ManifestError(f"{where}: {len(raw)} bytes, more than the {MANIFEST_MAX_BYTES} allowed")
    if sha256 is not None:
        got = hashlib.sha256(raw).hexdigest()
        if got != sha256:
            raise ManifestError(f"{where}: sha256 {got[:16]}... but the run config says {sha256[:16]}... "
                                "(wrong file, or it changed after the run config was written)")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{where} is not valid JSON: {exc}") from None
    if isinstance(doc, dict) and doc.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{where}: format {doc.get('format')!r}, this version reads format "
                            f"{MANIFEST_FORMAT}: rebuild it with scripts/prepare_dataset.py")
    try:
        return DatasetManifest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "manifest"
        raise ManifestError(f"{where}: {loc}: {first['msg']} ({exc.error_count()} problem(s))") from None
