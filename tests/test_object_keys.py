"""protocol/keys.py: every object key of a run is built and parsed back as a typed value, and the
text of each key is exactly what it was before keys were typed (objects in existing buckets and
the miners of older builds keep finding each other's objects)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from protocol.keys import (HopOutputKey, ModelKey, PieceKey, PseudogradKey, StateKey, UpdateKey, model_key_in,
                           parse_key, round_prefix, staging_of, stage_prefix, sync_round_prefix)

ROOT = Path(__file__).resolve().parent.parent
SHA = "ab" * 32
HK = "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"

# (typed key, final text, staging text): the table pins the stored spelling of every kind of object
TABLE = [
    (HopOutputKey("run-1", 3, 1, "act", "h42"), "runs/run-1/r3/s1/act/h42", "runs/run-1/r3/s1/upload/act/h42"),
    (HopOutputKey("run-1", 0, 2, "grad", "h7"), "runs/run-1/r0/s2/grad/h7", "runs/run-1/r0/s2/upload/grad/h7"),
    (PseudogradKey("t", 4, 0, HK, SHA), f"runs/t/r4/s0/pg/{HK}-{SHA}", f"runs/t/r4/s0/upload/{HK}/pg-{SHA}"),
    (StateKey("t", 5, 0, HK, SHA), f"runs/t/r5/s0/state/{HK}-{SHA}", f"runs/t/r4/s0/upload/{HK}/state-{SHA}"),
    (PieceKey("t", 2, 1, HK, 3, SHA), f"runs/t/r2/s1/sync/pg/{HK}/00003-{SHA}",
     f"runs/t/r2/s1/sync/pg/{HK}/upload-{HK}/00003-{SHA}"),
    (UpdateKey("t", 2, 1, 17, HK, SHA), f"runs/t/sync/r2/s1/merged/00017/{HK}-{SHA}",
     f"runs/t/sync/r2/s1/merged/00017/upload-{HK}/{HK}-{SHA}"),
    (ModelKey("t", 12), "runs/t/model/round-00000012.json", "runs/t/model/round-00000012.json"),
    (ModelKey("t"), "runs/t/model/latest.json", "runs/t/model/latest.json"),
]


@pytest.mark.parametrize("key,final,staging", TABLE, ids=[type(k).__name__ + "-" + f for k, f, _ in TABLE])
def test_every_key_kind_spells_its_stored_text_and_parses_back_to_itself(key, final, staging):
    assert key.final == final and key.staging == staging
    back = parse_key(final)
    assert back.key == key and back.staging is False
    if staging != final:
        up = parse_key(staging)
        assert up.key == key and up.staging is True
        assert staging_of(final) == staging


def test_prefixes_hold_their_round_s_objects_and_nothing_of_the_next_round():
    assert round_prefix("t", 1) == "runs/t/r1/" and stage_prefix("t", 1, 0) == "runs/t/r1/s0/"
    assert sync_round_prefix("t", 1) == "runs/t/sync/r1/"
    assert PieceKey("t", 1, 0, HK, 0, SHA).final.startswith(stage_prefix("t", 1, 0))
    assert UpdateKey("t", 1, 0, 0, HK, SHA).final.startswith(sync_round_prefix("t", 1))
    assert not HopOutputKey("t", 11, 0, "act", "h").final.startswith(round_prefix("t", 1))  # r1/ is not r11/
    assert model_key_in("/runs/t/", 3) == ModelKey("t", 3).final


@pytest.mark.parametrize("text", [
    "", "runs", "runs/t", "/runs/t/r1/s0/act/h", "bucket/t/r1/s0/act/h", "runs//r1/s0/act/h",
    "runs/t/r01/s0/act/h",                                 # one spelling only: no leading zeros
    "runs/t/r1/s0/act/h/extra", "runs/t/r1/s0/weights/h", "runs/t/rx/s0/act/h", "runs/t/r1/s-1/act/h",
    f"runs/t/r1/s0/pg/{HK}-{SHA[:-1]}",                    # a sha256 is 64 hex digits
    f"runs/t/r1/s0/pg/{HK}-{SHA.upper()}",
    f"runs/t/r1/s0/pg/-{SHA}",                             # no hotkey
    f"runs/t/r1/s0/sync/pg/{HK}/3-{SHA}",                  # a shard index is 5 digits
    f"runs/t/r1/s0/sync/pg/{HK}/upload-someoneelse/00003-{SHA}",  # a staging folder names its writer
    f"runs/t/sync/r1/s0/merged/00001/upload-x/{HK}-{SHA}",
    f"runs/t/sync/r1/s0/votes/00001/{HK}-{SHA}",
    "runs/t/model/round-12.json", "runs/t/model/best.json", "runs/../../etc/passwd", "z" * 512,
])
def test_text_that_is_no_object_key_is_refused_with_a_message_naming_it(text):
    with pytest.raises(KeyError) as info:
        parse_key(text)
    assert "is not an object key of a run" in str(info.value)


def test_staging_of_refuses_a_staging_key_so_no_one_derives_a_key_from_a_key_it_was_granted():
    with pytest.raises(KeyError, match="staging key, not a final one"):
        staging_of(PieceKey("t", 1, 0, HK, 0, SHA).staging)


KEY_TEXT = re.compile(r"runs/|/upload[/-]|/pg/|/state/|/merged/|sync/r|/model/")


def _spelled_keys(path: Path, root: Path = ROOT) -> list[str]:
    """f-strings of a source file whose literal text spells part of an object key (a key has no
    space: messages that quote a key's shape to a user are not keys)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if KEY_TEXT.search(text) and " " not in text:
                out.append(f"{path.relative_to(root)}:{node.lineno}: {text[:60]!r}")
    return out


def test_no_module_but_protocol_keys_spells_an_object_key():
    found = [hit for pkg in ("bridge", "neurons", "protocol", "drills", "scripts", "resbm")
             for p in sorted((ROOT / pkg).rglob("*.py")) if p != ROOT / "protocol" / "keys.py"
             for hit in _spelled_keys(p)]
    assert found == []


def test_the_key_text_scan_sees_an_f_string_key(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('def k(run, r, h):\n    print(f"see runs/{run} for it")\n    return f"runs/{run}/r{r}/{h}"\n')
    assert _spelled_keys(src, tmp_path) == ["m.py:3: 'runs//r/'"]
