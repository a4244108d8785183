"""The network benchmark's pure parts: time split from hop records, the table, the markdown section."""
from __future__ import annotations

import pytest

from scripts.bench_network import SECTION, analyse_hops, format_table, write_markdown

A, B = "hk-stage0", "hk-stage1"


def _hop(hid, miner, stage, kind, rnd, leased, done, out_size=100, act_in=None, grad_in=None, sample=0):
    return {"hop_id": hid, "sample_id": sample, "round": rnd, "stage": stage, "kind": kind, "leased_to": miner,
            "leased_at": leased, "done_at": done, "out_size": out_size, "act_in": act_in, "grad_in": grad_in}


def _hops():
    ref = ["k", "sha", 100]
    return [
        _hop("f0", A, 0, "fwd", 0, 10.0, 11.0, sample=0),
        _hop("f1", A, 0, "fwd", 0, 10.0, 12.0, sample=1),          # overlaps f0: union 10..12
        _hop("fb0", B, 1, "fwdbwd", 0, 12.0, 13.0, act_in=ref, sample=0),
        _hop("fb1", B, 1, "fwdbwd", 0, 13.0, 14.0, act_in=ref, sample=1),
        _hop("b0", A, 0, "bwd", 0, 14.0, 15.0, out_size=0, grad_in=ref, sample=0),
        _hop("b1", A, 0, "bwd", 0, 15.0, 16.0, out_size=0, grad_in=ref, sample=1),
        _hop("f2", A, 0, "fwd", 1, 30.0, 31.0, sample=2),           # round 1: the gap 16..30 is a merge
        _hop("fb2", B, 1, "fwdbwd", 1, 31.0, 32.0, act_in=ref, sample=2),
        _hop("b2", A, 0, "bwd", 1, 32.0, 33.0, out_size=0, grad_in=ref, sample=2),
    ]


def test_time_split_counts_windows_per_round_and_idle_gaps():
    status = {"m0": {"compute_seconds": 4.0, "active_seconds": 23.0, "compute_fraction": 0.1, "net_seconds": 1.0},
              "m1": {"compute_seconds": 2.5, "active_seconds": 20.0}}
    r = analyse_hops(_hops(), status, {A: "m0", B: "m1"}, tokens_per_sample=10, mbps=8.0, latency_ms=100.0)
    assert r["samples"] == 3 and r["span_s"] == pytest.approx(23.0)
    assert r["tokens_per_s"] == pytest.approx(30 / 23.0)
    assert (r["fwd_object_bytes"], r["bwd_object_bytes"], r["boundary_bytes"]) == (100, 100, 600)
    m0, m1 = r["miners"]
    assert (m0["name"], m0["stage"], m0["hops"]) == ("m0", 0, 6)
    assert m0["train_window_s"] == pytest.approx(6.0 + 3.0)     # 10..16 and 30..33, not the merge gap
    assert m0["held_s"] == pytest.approx(2.0 + 2.0 + 1.0 + 1.0)  # 10..12, 14..16, 30..31, 32..33
    assert m0["idle_s"] == pytest.approx(2.0 + 1.0)              # 12..14 and 31..32
    assert m0["held_noncompute_s"] == pytest.approx(2.0)
    assert m0["train_fraction"] == pytest.approx(4.0 / 9.0)
    assert m0["merge_etc_s"] == pytest.approx(23.0 - 9.0)
    # 3 fwd uploads + 3 grad downloads of 100 bytes at 8 Mbit/s (100 us each) plus 100 ms latency each
    assert m0["link_model_s"] == pytest.approx(6 * 0.1 + 600 * 8 / 8e6)
    assert m1["idle_s"] == pytest.approx(0.0) and m1["train_window_s"] == pytest.approx(3.0)


def test_no_done_hops_is_a_clear_error():
    with pytest.raises(ValueError, match="no done hops"):
        analyse_hops([], {}, {}, tokens_per_sample=1, mbps=0, latency_ms=0)


def test_table_reports_throughput_relative_to_single_process():
    r = analyse_hops(_hops(), {}, {A: "m0", B: "m1"}, tokens_per_sample=10, mbps=0, latency_ms=0)
    r.update(name="c", label="subnet resbm")
    table = format_table([{"name": "a", "label": "single", "tokens_per_s": 26.0, "wall_s": 1.0}, r])
    rows = table.splitlines()
    assert len(rows) == 2 + 1 + 2
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert f"{30 / 23.0 / 26.0:.2f}x" in rows[3]


def test_markdown_section_is_replaced_and_other_sections_kept(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Current results\n\n### Compression\n\nkeep me\n")
    write_markdown(path, "first table")
    write_markdown(path, "second table\n\n#### its own subsection")
    path.write_text(path.read_text() + "\n### Later topic\n\nalso keep\n\n## Appendix\n\nold\n")
    write_markdown(path, "third table")
    text = path.read_text()
    assert text.count(SECTION) == 1
    assert "keep me" in text and "also keep" in text and "third table" in text and "old" in text
    assert "first table" not in text and "second table" not in text and "its own subsection" not in text
    assert text.index("### Compression") < text.index(SECTION) < text.index("### Later topic") < text.index("## Appendix")
