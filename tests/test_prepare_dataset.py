"""scripts/prepare_dataset.py: text, JSONL and Parquet in; shards, tokenizer and manifest out,
deterministically; a trained or given tokenizer; bad input named in one line."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spec.dataset import parse_manifest
from resbm import data
from scripts import prepare_dataset

PROSE = "The quick brown fox jumps over the lazy dog, and the kernel schedules every task in turn. "


def _inputs(root):
    root.mkdir()
    (root / "notes").mkdir()
    for i in range(6):
        (root / "notes" / f"n{i}.md").write_text(f"# Note {i}\n" + PROSE * (5 + i))
    (root / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}. " + PROSE * 3, "id": i}) + "\n"
                                             for i in range(30)) + "\n")
    pq.write_table(pa.table({"body": [f"parquet {i}: " + PROSE * 4 for i in range(25)]}), root / "t.parquet")
    return root


def test_builds_loadable_shards_from_every_format_identically_twice(tmp_path):
    src = _inputs(tmp_path / "in")
    args = [str(src / "notes"), str(src / "rows.jsonl"), "--name", "mixed", "--vocab-size", "300",
            "--shard-tokens", "700", "--val-fraction", "0.2"]
    assert prepare_dataset.main(args + ["--out", str(tmp_path / "a")]) == 0
    assert prepare_dataset.main(args + ["--out", str(tmp_path / "b")]) == 0
    raw = (tmp_path / "a" / "manifest.json").read_bytes()
    assert raw == (tmp_path / "b" / "manifest.json").read_bytes()
    m = parse_manifest(raw)
    assert m.vocab_size == 300 and m.token_dtype == "uint16" and len(m.split_shards("train")) >= 2
    for f in (m.tokenizer, *m.shards):
        assert (tmp_path / "a" / f.name).read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    assert m.info["splits"]["train"]["documents"] + m.info["splits"]["val"]["documents"] == 36
    ds = data.load(tmp_path / "a")
    tok, tgt = ds.batch(0, 3, 2, 24)
    assert tok.shape == (2, 24) and int(tok.max()) < 300
    text = data.decode_tokens(ds.tokens("train")[:200], dataset=ds)
    assert "quick brown fox" in text
    assert not list((tmp_path / "a").glob("tmp*"))  # the staging folder is gone


def test_parquet_with_an_existing_tokenizer(tmp_path):
    src = _inputs(tmp_path / "in")
    out = tmp_path / "pq"
    assert prepare_dataset.main([str(src / "t.parquet"), "--name", "pq", "--out", str(out), "--text-field", "body",
                                 "--val-fraction", "0.2", "--tokenizer", str(data.default_data_dir() / "tokenizer.json")]) == 0
    m = parse_manifest((out / "manifest.json").read_bytes())
    assert m.vocab_size == data.VOCAB_SIZE and m.eot_id == data.load().manifest.eot_id
    assert "parquet" in data.decode_tokens(data.load(out).tokens("train")[:50], data_dir=out)


@pytest.mark.parametrize("setup,extra,match", [
    (lambda d: (d / "x.jsonl").write_text('{"text": "a"}\nnot json\n'), [], r"x.jsonl:2: not JSON"),
    (lambda d: (d / "x.jsonl").write_text('{"body": "a"}\n'), [], r"no 'text' field"),
    (lambda d: (d / "x.jsonl").write_text('{"text": 5}\n'), [], r"not a string"),
    (lambda d: pq.write_table(pa.table({"a": ["x"]}), d / "x.parquet"), [], r"no column 'text'"),
    (lambda d: (d / "x.bin").write_bytes(b"\0"), [], r"no .txt/.md/.rst/.jsonl/.parquet files"),
    (lambda d: (d / "x.txt").write_text(PROSE), ["--val-fraction", "0.7"], r"--val-fraction must be in"),
    (lambda d: (d / "x.txt").write_text(PROSE), ["--upload", "bucket-only"], None),
])
def test_bad_inputs_are_named(tmp_path, setup, extra, match):
    src = tmp_path / "in"
    src.mkdir()
    setup(src)
    args = [str(src), "--name", "bad", "--out", str(tmp_path / "o"), "--vocab-size", "300", *extra]
    if match is None:  # one tiny document: the val split is empty, said before any upload
        match = r"split is empty|--upload must look like"
    with pytest.raises(SystemExit, match=match):
        prepare_dataset.main(args)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_val_rule_is_stable_per_document():
    ids = [f"doc{i}" for i in range(2000)]
    held = [i for i in ids if prepare_dataset.is_val(i, 0.1)]
    assert 150 < len(held) < 250
    assert held == [i for i in ids[:1000] if prepare_dataset.is_val(i, 0.1)] + \
        [i for i in ids[1000:] if prepare_dataset.is_val(i, 0.1)]
