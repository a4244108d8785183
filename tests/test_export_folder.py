"""The export folder (resbm.export): stitched stage weights load into the monolithic model under its
own names, the folder appears whole or not at all, a non-empty target is refused unless forced,
and a folder that is not an export says so in one line."""
from __future__ import annotations

import json

import pytest
import torch

from resbm.config import ModelConfig
from resbm.export import ExportError, load_export, stitch, write_export
from resbm.model import build_model
from resbm.stages import build_stages
from tests.servers import REPO

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=8, bottleneck_dim=4)
TOKENIZER = REPO / "resbm" / "assets" / "tokenizer.json"
INFO = {"run_id": "r", "round": 4, "total_rounds": 9, "sync_mode": "state", "samples_trained": 40,
        "batch_size": 2, "tokens_trained": 640, "training_loss": 6.5, "eot_id": 0,
        "validation": {"loss": 6.25, "validators": 3, "tokens": 512}, "measured": None,
        "stages": [{"stage": 0, "sha256": "a" * 64, "checkpoint_round": 5, "updates": 0}], "source": "http://b"}


def _thetas(seed: int) -> list[dict]:
    return [s.state_dict() for s in build_stages(CFG, seed=seed)]


def test_stitched_stages_are_the_monolithic_model_of_the_same_seed():
    state = stitch(_thetas(3), CFG)
    want = build_model(CFG, seed=3).state_dict()
    assert set(state) == set(want) and all(torch.equal(state[n], want[n]) for n in want)
    broken = _thetas(3)
    broken[1] = {k: v for k, v in broken[1].items() if not k.startswith("head")}
    with pytest.raises(ExportError, match="do not make up the model"):
        stitch(broken, CFG)
    with pytest.raises(ExportError):
        stitch(_thetas(3)[:1], CFG)


def test_write_and_load_round_trip_with_a_card_that_says_what_export_json_says(tmp_path):
    out = write_export(tmp_path / "m", stitch(_thetas(3), CFG), CFG, TOKENIZER, INFO)
    ex = load_export(out)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_len))
    with torch.no_grad():
        assert torch.equal(ex.model(tokens), build_model(CFG, seed=3).eval()(tokens))
    assert ex.config == CFG and json.loads((out / "config.json").read_text()) == CFG.to_dict()
    assert ex.info["format"] == "resbm-export/1" and ex.info["round"] == 4
    card = (out / "README.md").read_text()
    for needle in ("run `r`, after round 4", "5 of 9 rounds", "tokens trained: 640", "median of 3", "6.2500",
                   "k = 4 code (8x narrower)", "a" * 64):
        assert needle in card, needle
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    again = write_export(tmp_path / "m2", stitch(_thetas(3), CFG), CFG, TOKENIZER, INFO)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()  # reproducible


def test_a_non_empty_target_is_refused_unless_forced_and_a_failed_write_leaves_nothing(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    state = stitch(_thetas(3), CFG)
    with pytest.raises(ExportError, match="--force"):
        write_export(out, state, CFG, TOKENIZER, INFO)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(FileNotFoundError):  # a crash half-way (here: the tokenizer is gone)
        write_export(out, state, CFG, tmp_path / "missing.json", INFO, force=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]  # the old folder is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # and no half-written one lies around
    write_export(out, state, CFG, TOKENIZER, INFO, force=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(["model.safetensors", "config.json", "tokenizer.json",
                                                            "export.json", "README.md"])


def test_a_folder_that_is_not_an_export_is_named_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="missing model.safetensors"):
        load_export(tmp_path)
    out = write_export(tmp_path / "m", stitch(_thetas(3), CFG), CFG, TOKENIZER, INFO)
    (out / "model.safetensors").write_bytes(b"\x80\x04not safetensors")  # a pickle's opening bytes
    with pytest.raises(ExportError, match="does not load"):
        load_export(out)
    other = ModelConfig(d_model=64, n_layers=2, n_heads=2, seq_len=8, bottleneck_dim=4)
    write_export(tmp_path / "n", stitch(_thetas(3), CFG), CFG, TOKENIZER, INFO)
    (tmp_path / "n" / "config.json").write_text(json.dumps(other.to_dict()))
    with pytest.raises(ExportError, match="does not match config.json"):
        load_export(tmp_path / "n")
