"""Build a training dataset: text, JSONL or Parquet in; token shards, tokenizer and manifest out.

    python scripts/prepare_dataset.py --name mycorpus --out data/mycorpus --vocab-size 32768 docs/ extra.jsonl
    python scripts/prepare_dataset.py --name mycorpus --out data/mycorpus --tokenizer tokenizer.json \\
        --upload s3://bucket/datasets/mycorpus --s3-endpoint http://127.0.0.1:9000   # keys from AWS_* env

Inputs (files or folders, read recursively in sorted order): `.txt`/`.md`/`.rst` (one document per
file), `.jsonl` (one document per line, text in --text-field) and `.parquet` (one per row, column
--text-field). A document goes to the validation split when sha256 of its id falls under
--val-fraction, so the split is stable as documents are added. The tokenizer is an existing
`tokenizer.json` or a byte-level BPE trained here on the train split. Output is deterministic:
the same inputs give the same bytes. The printed `dataset:` block goes into the run config.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.dataset_writer import EOT, train_tokenizer, write_dataset  # noqa: E402

__all__ = ["iter_documents", "is_val", "main", "upload", "upload_folder"]

log = logging.getLogger("prepare_dataset")

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def is_val(doc_id: str, val_fraction: float) -> bool:
    """Whether a document is held out: sha256(id) read as a fraction in [0, 1) is below val_fraction."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") < val_fraction * 2**64


def _files(paths: list[Path]) -> list[tuple[Path, str]]:
    out = []
    for p in paths:
        if p.is_dir():
            out += [(f, f.relative_to(p).as_posix()) for f in sorted(p.rglob("*")) if f.is_file()
                    and f.suffix in (*TEXT_SUFFIXES, ".jsonl", ".parquet")]
        elif p.is_file():
            out.append((p, p.name))
        else:
            raise SystemExit(f"input {p} does not exist")
    if not out:
        raise SystemExit(f"no .txt/.md/.rst/.jsonl/.parquet files under {[str(p) for p in paths]}")
    return out


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise SystemExit(f"{where}: the text field is {type(value).__name__}, not a string (see --text-field)")
    return value


def iter_documents(paths: list[Path], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """Every (doc_id, text) of the inputs, in a fixed order; empty documents skipped."""
    for path, rel in _files(paths):
        if path.suffix in TEXT_SUFFIXES:
            docs = [(rel, path.read_text("utf-8", errors="replace"))]
        elif path.suffix == ".jsonl":
            docs = []
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError as exc:
                            raise SystemExit(f"{path}:{i + 1}: not JSON ({exc})") from None
                        if not isinstance(row, dict) or text_field not in row:
                            raise SystemExit(f"{path}:{i + 1}: no {text_field!r} field (see --text-field)")
                        docs.append((f"{rel}:{i}", _text(row[text_field], f"{path}:{i + 1}")))
        else:
            docs = _parquet(path, rel, text_field)
        for doc_id, text in docs:
            if text.strip():
                yield doc_id, text.replace("\r\n", "\n")


def _parquet(path: Path, rel: str, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise SystemExit(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}; see --text-field)")
    row = 0
    for rb in pf.iter_batches(columns=[text_field], batch_size=1024):
        for value in rb.column(0).to_pylist():
            yield f"{rel}:{row}", _text(value, f"{path} row {row}")
            row += 1


def upload(out: Path, manifest: dict, dest: str, endpoint: str | None,
           keys: tuple[str, str] | None = None) -> str:
    """Copy the dataset to s3://bucket/prefix (bucket created if missing, manifest last); returns
    the manifest's key. Credentials: `keys`, else the usual AWS_* environment."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    if not dest.startswith("s3://") or "/" not in dest[5:]:
        raise SystemExit(f"--upload must look like s3://bucket/prefix, got {dest!r}")
    bucket, prefix = dest[5:].split("/", 1)
    prefix = prefix.strip("/")
    creds = dict(aws_access_key_id=keys[0], aws_secret_access_key=keys[1]) if keys else {}
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"}), **creds)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
    names = [manifest["tokenizer"]["name"], *(s["name"] for s in manifest["shards"]), "manifest.json"]
    for name in names:  # the manifest last: a reader never sees it before its files
        s3.upload_file(str(out / name), bucket, f"{prefix}/{name}")
        log.info("uploaded s3://%s/%s/%s", bucket, prefix, name)
    return f"{prefix}/manifest.json"


def upload_folder(folder: Path, dest: str, endpoint: str | None, keys: tuple[str, str] | None = None) -> dict:
    """Upload a prepared dataset folder; returns the run config's `dataset` mapping (key + sha256)."""
    raw = (Path(folder) / "manifest.json").read_bytes()
    key = upload(Path(folder), json.loads(raw), dest, endpoint, keys)
    return {"manifest": key, "sha256": hashlib.sha256(raw).hexdigest()}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="files or folders (.txt .md .rst .jsonl .parquet)")
    p.add_argument("--name", required=True, help="dataset name (lowercase slug), recorded in the manifest")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", type=Path, help="an existing tokenizer.json")
    tok.add_argument("--vocab-size", type=int, help="train a byte-level BPE of this size on the train split")
    p.add_argument("--text-field", default="text", help="JSONL field / Parquet column holding the text")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out (by id hash)")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64M)")
    p.add_argument("--upload", default=None, help="s3://bucket/prefix to copy the dataset to")
    p.add_argument("--s3-endpoint", default=os.environ.get("AWS_ENDPOINT_URL"), help="S3 endpoint URL")
    return p


def _build(args: argparse.Namespace, tmp: Path) -> dict:
    def docs(split: str) -> Iterator[tuple[str, str]]:
        return ((i, t) for i, t in iter_documents(args.inputs, args.text_field)
                if is_val(i, args.val_fraction) == (split == "val"))

    if args.tokenizer is not None:
        from tokenizers import Tokenizer

        if not args.tokenizer.is_file():
            raise SystemExit(f"--tokenizer {args.tokenizer} does not exist")
        tok = Tokenizer.from_file(str(args.tokenizer))
    else:
        if not 256 < args.vocab_size <= 1 << 20:
            raise SystemExit(f"--vocab-size must be in 257..{1 << 20}, got {args.vocab_size}")
        log.info("training a byte-level BPE of %d on the train split", args.vocab_size)
        tok = train_tokenizer((t for _, t in docs("train")), args.vocab_size)
    if tok.token_to_id(EOT) is None:
        log.warning("the tokenizer has no %s token: documents are concatenated without a separator", EOT)
    inputs = [p.name for p in args.inputs]  # names only: the same files elsewhere give the same manifest
    return write_dataset(tok, {"train": docs("train"), "val": docs("val")}, tmp, args.name, args.shard_tokens,
                         {"inputs": inputs, "val_fraction": args.val_fraction, "split_rule": "sha256(doc id)"})


def main(argv: list[str] | None = None) -> int:
    """Entry point: build into a temporary folder, then move the files into --out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: the same merges on every machine
    args = _parser().parse_args(argv)
    if not 0 < args.val_fraction < 0.5:
        raise SystemExit(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        manifest = _build(args, Path(tmp))
        for f in [manifest["tokenizer"]["name"], *(s["name"] for s in manifest["shards"]), "manifest.json"]:
            os.replace(Path(tmp) / f, args.out / f)
    raw = (args.out / "manifest.json").read_bytes()
    key = str(args.out / "manifest.json")
    if args.upload:
        key = upload(args.out, manifest, args.upload, args.s3_endpoint)
    splits = manifest["info"]["splits"]
    log.info("wrote %s: vocab %d, %d train / %d val tokens in %d shards", args.out, manifest["vocab_size"],
             splits["train"]["tokens"], splits["val"]["tokens"], len(manifest["shards"]))
    print(f"dataset:\n  manifest: {key}\n  sha256: {hashlib.sha256(raw).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
