"""Every object key of a run, built and parsed as a typed value (the one place key text is written).

A key names what an object is, so a key type holds the fields it is made of and renders them:

| type | final key (write-once: only the bridge writes it, by a server-side copy) | staging key (the writer's presigned PUT) |
|---|---|---|
| `HopOutputKey` | `runs/{run}/r{round}/s{stage}/{act|grad}/{hop_id}` | `runs/{run}/r{round}/s{stage}/upload/{act|grad}/{hop_id}` |
| `StateKey` | `runs/{run}/r{round}/s{stage}/state/{hotkey}-{sha256}` | `runs/{run}/r{round-1}/s{stage}/upload/{hotkey}/state-{sha256}` |
| `PieceKey` | `runs/{run}/r{round}/s{stage}/sync/pg/{hotkey}/{shard:05d}-{sha256}` | the final key's folder + `upload-{hotkey}/` + its name |
| `UpdateKey` | `runs/{run}/sync/r{round}/s{stage}/merged/{shard:05d}/{hotkey}-{sha256}` | the final key's folder + `upload-{hotkey}/` + its name |

A `StateKey`'s round is the round the state starts (the merge of round r writes the state of r+1;
its staging key lives under round r, where the voter merged). `parse_key` reads any of these back
(final or staging); anything else is a `KeyError` naming the text. Prefixes for listing and garbage
collection: `round_prefix`, `sync_round_prefix`, `state_prefix`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

__all__ = ["HopOutputKey", "StateKey", "PieceKey", "UpdateKey", "ObjectKey", "ParsedKey", "parse_key",
           "round_prefix", "sync_round_prefix", "state_prefix"]

_HEX = frozenset("0123456789abcdef")


def _sha(text: str) -> str:
    if len(text) != 64 or not set(text) <= _HEX:
        raise KeyError(f"not a lowercase hex sha256: {text[:80]!r}")
    return text


def _num(text: str, prefix: str) -> int:
    if not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise KeyError(f"expected {prefix}<number>, got {text[:40]!r}")
    return int(text[len(prefix):])


def _stage_dir(run: str, round_: int, stage: int) -> str:
    return f"runs/{run}/r{round_}/s{stage}"


def round_prefix(run: str, round_: int) -> str:
    """`runs/{run}/r{round}/`: every per-round object (hop outputs, pieces, states starting then)."""
    return f"runs/{run}/r{round_}/"


def sync_round_prefix(run: str, round_: int) -> str:
    """`runs/{run}/sync/r{round}/`: the merged updates of a round (kept while catch-up needs them)."""
    return f"runs/{run}/sync/r{round_}/"


def state_prefix(run: str, round_: int, stage: int) -> str:
    """`runs/{run}/r{round}/s{stage}/state/`: every voter's copy of the state a stage starts `round` from."""
    return f"{_stage_dir(run, round_, stage)}/state/"


@dataclass(frozen=True)
class HopOutputKey:
    """A hop's output (`act`: forward code, `grad`: gradient of the code)."""

    run: str
    round: int
    stage: int
    part: Literal["act", "grad"]
    hop_id: str

    @property
    def final(self) -> str:
        """Sealed at `done`; the consumers' GETs read it."""
        return f"{_stage_dir(self.run, self.round, self.stage)}/{self.part}/{self.hop_id}"

    @property
    def staging(self) -> str:
        """The producer's presigned PUT."""
        return f"{_stage_dir(self.run, self.round, self.stage)}/upload/{self.part}/{self.hop_id}"


@dataclass(frozen=True)
class StateKey:
    """A voter's copy of a stage's full state (a checkpoint) for the round it starts."""

    run: str
    round: int
    stage: int
    hotkey: str
    sha256: str

    @property
    def final(self) -> str:
        """Where the bridge copies a reported state."""
        return f"{state_prefix(self.run, self.round, self.stage)}{self.hotkey}-{self.sha256}"

    @property
    def staging(self) -> str:
        """The voter's PUT, under the round it merged (`round - 1`)."""
        return f"{_stage_dir(self.run, self.round - 1, self.stage)}/upload/{self.hotkey}/state-{self.sha256}"


def _staged(final: str, hotkey: str) -> str:
    folder, name = final.rsplit("/", 1)
    return f"{folder}/upload-{hotkey}/{name}"


@dataclass(frozen=True)
class PieceKey:
    """One shard of a replica's pseudo-gradient (deleted with its round's objects)."""

    run: str
    round: int
    stage: int
    hotkey: str
    shard: int
    sha256: str

    @property
    def final(self) -> str:
        """Where the bridge seals a reported piece."""
        return (f"{_stage_dir(self.run, self.round, self.stage)}/sync/pg/{self.hotkey}/"
                f"{self.shard:05d}-{self.sha256}")

    @property
    def staging(self) -> str:
        """The replica's PUT."""
        return _staged(self.final, self.hotkey)


@dataclass(frozen=True)
class UpdateKey:
    """A merger's copy of one shard's merged update (kept while catch-up replays it)."""

    run: str
    round: int
    stage: int
    shard: int
    hotkey: str
    sha256: str

    @property
    def final(self) -> str:
        """Where the bridge seals a voted update."""
        return (f"{sync_round_prefix(self.run, self.round)}s{self.stage}/merged/{self.shard:05d}/"
                f"{self.hotkey}-{self.sha256}")

    @property
    def staging(self) -> str:
        """The merger's PUT."""
        return _staged(self.final, self.hotkey)


ObjectKey = Union[HopOutputKey, StateKey, PieceKey, UpdateKey]


@dataclass(frozen=True)
class ParsedKey:
    """A key read back: the typed value and whether the text was its staging form."""

    key: ObjectKey
    staging: bool


def _split_named(name: str) -> tuple[str, str]:
    """`{hotkey}-{sha256}` -> (hotkey, sha256)."""
    who, _, sha = name.rpartition("-")
    if not who:
        raise KeyError(f"expected <hotkey>-<sha256>, got {name[:80]!r}")
    return who, _sha(sha)


def _parse(parts: list[str]) -> ParsedKey:
    if len(parts) < 5 or parts[0] != "runs" or not parts[1]:
        raise KeyError("not under runs/<run>/")
    run = parts[1]
    if parts[2] == "sync":  # runs/{run}/sync/r{r}/s{s}/merged/{shard}/[upload-{hk}/]{hk}-{sha}
        if len(parts) not in (8, 9) or parts[5] != "merged":
            raise KeyError("not a merged-update key")
        round_, stage, shard = _num(parts[3], "r"), _num(parts[4], "s"), int(_shard(parts[6]))
        hotkey, sha = _split_named(parts[-1])
        key = UpdateKey(run, round_, stage, shard, hotkey, sha)
        return ParsedKey(key, _check_stage_form(parts, 9, hotkey))
    round_, stage, rest = _num(parts[2], "r"), _num(parts[3], "s"), parts[4:]
    if rest[0] in ("act", "grad") and len(rest) == 2:
        return ParsedKey(HopOutputKey(run, round_, stage, rest[0], _hop_id(rest[1])), False)
    if rest[0] == "upload" and len(rest) == 3 and rest[1] in ("act", "grad"):
        return ParsedKey(HopOutputKey(run, round_, stage, rest[1], _hop_id(rest[2])), True)
    if rest[0] == "state" and len(rest) == 2:
        hotkey, sha = _split_named(rest[1])
        return ParsedKey(StateKey(run, round_, stage, hotkey, sha), False)
    if rest[0] == "upload" and len(rest) == 3 and rest[2].startswith("state-"):
        return ParsedKey(StateKey(run, round_ + 1, stage, _hotkey(rest[1]), _sha(rest[2][6:])), True)
    if rest[:2] == ["sync", "pg"] and len(rest) in (4, 5):
        hotkey = _hotkey(rest[2])
        shard, _, sha = rest[-1].partition("-")
        key = PieceKey(run, round_, stage, hotkey, int(_shard(shard)), _sha(sha))
        return ParsedKey(key, _check_stage_form(rest, 5, hotkey))
    raise KeyError("no object of a run is stored under this name")


def _check_stage_form(parts: list[str], staged_len: int, hotkey: str) -> bool:
    """Whether a piece or update key is the staging form (`upload-{hotkey}/` before its name)."""
    if len(parts) != staged_len:
        return False
    if parts[-2] != f"upload-{hotkey}":
        raise KeyError(f"a staging folder names its writer: upload-{hotkey}, not {parts[-2][:80]!r}")
    return True


def _shard(text: str) -> str:
    if len(text) != 5 or not text.isdigit():
        raise KeyError(f"a shard index is 5 digits, got {text[:20]!r}")
    return text


def _hotkey(text: str) -> str:
    if not text or len(text) > 64:
        raise KeyError(f"not a hotkey: {text[:80]!r}")
    return text


def _hop_id(text: str) -> str:
    if not text or len(text) > 64:
        raise KeyError(f"not a hop id: {text[:80]!r}")
    return text


def parse_key(text: str) -> ParsedKey:
    """The typed key `text` spells (final or staging form); KeyError naming it otherwise."""
    try:
        parsed = _parse(text.split("/"))
    except KeyError as exc:
        raise KeyError(f"{text[:200]!r} is not an object key of a run: {exc.args[0]}") from None
    spelled = parsed.key.staging if parsed.staging else parsed.key.final
    if spelled != text:  # e.g. a shard index or round spelled with leading zeros: one spelling only
        raise KeyError(f"{text[:200]!r} is not an object key of a run: it is spelled {spelled[:200]!r}")
    return parsed
