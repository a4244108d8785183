"""What the trained-model commands (`resbm-export`, `resbm-generate`, `resbm-eval`) share:
settings (flag > RESBM_* environment > .env > default), one-line errors with an exit code, the
device, opening an export folder and a dataset manifest."""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Optional

from pydantic_settings import BaseSettings, SettingsConfigDict

from neurons.dataset_http import HttpSource
from protocol.dataset import DatasetRef
from protocol.exits import Exit, Misconfigured
from protocol.settings import ENV_PREFIX, flag
from resbm import data
from resbm.dataset import Dataset, open_dataset, open_local
from resbm.dataset_store import DataError
from resbm.export import ExportError, Exported, load_export

__all__ = ["ModelToolSettings", "flag", "device_of", "open_export", "open_manifest", "quiet_logs",
           "check_same_tokenizer", "progress_bar"]


class ModelToolSettings(BaseSettings):
    """Settings every model command takes."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      env_file_encoding="utf-8", env_ignore_empty=True)

    device: str = flag("cpu", "cpu, cuda, cuda:N, mps, or auto (cuda, then mps, then cpu)")


def device_of(name: str) -> str:
    """A device this machine has (`Misconfigured` naming the fix otherwise)."""
    from neurons.cli import resolve_device
    return resolve_device(name)


def open_export(folder: str, device: str) -> Exported:
    """The export at `folder`, loaded on `device` (one line when it is not one)."""
    if not folder:
        raise Misconfigured(Exit.USAGE, "--model is required: the folder resbm-export wrote")
    try:
        return load_export(folder, device)
    except ExportError as exc:
        raise Misconfigured(Exit.CONFIG_FILE, str(exc)) from None


def open_manifest(where: str) -> Dataset:
    """A dataset from a local manifest.json (or its folder) or an http(s) URL of one."""
    try:
        if where.startswith(("http://", "https://")):
            base, name = where.rsplit("/", 1)
            raw = HttpSource(base).get_bytes(name, 16 << 20)
            ref = DatasetRef(manifest=where, sha256=hashlib.sha256(raw).hexdigest())
            return open_dataset(ref, remote=HttpSource)
        path = Path(where)
        if not path.exists():
            raise Misconfigured(Exit.CONFIG_FILE, f"--dataset {where} does not exist: give a dataset's "
                                f"manifest.json (the shipped corpus: {data.default_data_dir() / 'manifest.json'}) "
                                "or its URL")
        return open_local(path if path.is_dir() else path.parent)
    except DataError as exc:
        raise Misconfigured(Exit.CONFIG_FILE, f"dataset {where}: {exc}") from None


def quiet_logs(debug: bool = False) -> None:
    """Warnings only from the libraries; our own lines at INFO."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "resbm.data", "resbm.dataset"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_same_tokenizer(ds: Dataset, tokenizer_file: Path, vocab_size: int) -> Optional[str]:
    """Why `ds` cannot be used with a model of this tokenizer and vocab (None: it can)."""
    if ds.vocab_size != vocab_size:
        return f"the dataset's vocabulary has {ds.vocab_size} tokens, the model's {vocab_size}"
    theirs = ds.manifest.tokenizer.sha256
    ours = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    if theirs != ours:
        return "the dataset's tokenizer differs from the model's: its token ids stand for other text"
    return None


class _Percent:
    """A progress line every 10% on stderr, where tqdm (a localnet extra) is not installed."""

    def __init__(self, total: int, desc: str, quiet: bool) -> None:
        self.total, self.desc, self.n, self.shown, self.quiet = max(1, total), desc, 0, -1, quiet

    def update(self, n: int) -> None:
        self.n += n
        tenth = min(10, 10 * self.n // self.total)
        if tenth > self.shown and not self.quiet:
            self.shown = tenth
            print(f"{self.desc}: {10 * tenth}%", file=sys.stderr, flush=True)

    def __enter__(self) -> "_Percent":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, disable: bool = False):
    """A tqdm bar on stderr (bytes or tokens), or a percent line per 10% without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Percent(total, desc, disable)
    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=sys.stderr, disable=disable)
