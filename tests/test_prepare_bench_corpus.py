"""The bench-corpus builder: reads every source, keeps the assets' tokenizer, writes a corpus that
resbm.data loads, byte-identically on a second run; a missing source is named."""
from __future__ import annotations

import gzip
import json

import pytest

from resbm import data
from scripts import prepare_bench_corpus as pbc

PROSE = "The quick brown fox jumps over the lazy dog while the kernel schedules every task. " * 8


def _sources(root):
    (root / "shak").mkdir()
    for i in range(3):
        (root / "shak" / f"play{i}_gut.txt").write_text(f"Act {i}\n" + PROSE)
    verses = [{"book": b, "chapter": c, "verse": v, "text": PROSE[:120]}
              for b in ("Genesis", "Exodus") for c in (1, 2) for v in (1, 2)]
    (root / "kjv.jsonl").write_text("\n".join(json.dumps(v) for v in verses) + "\n")
    (root / "pydocs" / "tutorial").mkdir(parents=True)
    for i in range(3):
        (root / "pydocs" / "tutorial" / f"t{i}.rst.txt").write_text(f"Tutorial {i}\n" + PROSE)
    debs = root / "debs"
    ldoc = debs / "usr/share/doc/linux-doc-6.1/Documentation/sched"
    ldoc.mkdir(parents=True)
    for i in range(4):
        (ldoc / f"s{i}.rst.gz").write_bytes(gzip.compress(f"Scheduler {i}\n{PROSE}".encode()))
    (ldoc / "stub.rst").write_text("tiny")  # under 200 characters: skipped
    (debs / "usr/share/perl/pod").mkdir(parents=True)
    (debs / "usr/share/perl/pod/perlintro.pod").write_text("=head1 NAME\n\n" + PROSE)
    (debs / "usr/share/doc/git-doc").mkdir(parents=True)
    (debs / "usr/share/doc/git-doc/git-log.txt").write_text("git-log(1)\n" + PROSE)
    return ["--shakespeare-dir", str(root / "shak"), "--bible-jsonl", str(root / "kjv.jsonl"),
            "--pydocs-dir", str(root / "pydocs"), "--debs-root", str(debs), "--val-fraction", "0.2"]


def test_builds_a_loadable_corpus_with_the_assets_tokenizer_twice_identically(tmp_path):
    args = _sources(tmp_path)
    out1, out2 = tmp_path / "o1", tmp_path / "o2"
    assert pbc.main(args + ["--out", str(out1)]) == 0
    assert pbc.main(args + ["--out", str(out2)]) == 0
    m = json.loads((out1 / "manifest.json").read_text())
    assert (out1 / "manifest.json").read_bytes() == (out2 / "manifest.json").read_bytes()
    assert {s["name"] for s in m["info"]["sources"]} == {"shakespeare", "bible", "pydocs", "linuxdocs", "perldocs", "gitdocs"}
    linux = next(s for s in m["info"]["sources"] if s["name"] == "linuxdocs")
    assert linux["documents"] == 4  # the stub was skipped
    assert (out1 / "tokenizer.json").read_bytes() == (data.default_data_dir() / "tokenizer.json").read_bytes()
    for f in m["shards"]:
        assert (out1 / f["name"]).read_bytes() == (out2 / f["name"]).read_bytes()
    corpus = data.load(out1)
    tokens, targets = corpus.batch(0, 0, 2, 16)
    assert tokens.shape == (2, 16) and bool((tokens[:, 1:] == targets[:, :-1]).all())
    assert "scheduler" in data.decode_tokens(corpus.tokens("train")[:4000]).lower() or \
        "scheduler" in data.decode_tokens(corpus.tokens("val")).lower()


def test_a_missing_source_is_named(tmp_path):
    args = _sources(tmp_path)
    args[args.index("--debs-root") + 1] = str(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match="linux-doc-6.1"):
        pbc.main(args + ["--out", str(tmp_path / "o")])
