"""Every object key of a run, built and parsed as a typed value (the one place key text is spelled).

A key type holds the fields an object's name is made of and renders both its forms: the `final`
key (write-once: only the bridge writes it, by a server-side copy of what a writer reported) and
the `staging` key (the writer's own presigned PUT, the only one it gets a grant for).

| type | final | staging |
|---|---|---|
| `HopOutputKey` | `runs/{run}/r{round}/s{stage}/{act,grad}/{hop_id}` | `.../s{stage}/upload/{act,grad}/{hop_id}` |
| `PseudogradKey` | `runs/{run}/r{round}/s{stage}/pg/{hotkey}-{sha256}` | `.../s{stage}/upload/{hotkey}/pg-{sha256}` |
| `StateKey` | `runs/{run}/r{round}/s{stage}/state/{hotkey}-{sha256}` | `runs/{run}/r{round-1}/s{stage}/upload/{hotkey}/state-{sha256}` |
| `PieceKey` | `runs/{run}/r{round}/s{stage}/sync/pg/{hotkey}/{shard:05d}-{sha256}` | its folder + `upload-{hotkey}/` + its name |
| `UpdateKey` | `runs/{run}/sync/r{round}/s{stage}/merged/{shard:05d}/{hotkey}-{sha256}` | its folder + `upload-{hotkey}/` + its name |
| `ModelKey` | `runs/{run}/model/round-{round:08d}.json` (`latest.json` without a round) | none: the bridge writes it |

A `StateKey`'s round is the round the state starts (the merge of round r publishes the state of
r+1; its staging key sits under round r, where the voter merged). `PseudogradKey` is the
whole-state run's pseudo-gradient, `PieceKey` one shard of a sharded run's. `parse_key` reads any
of these back (either form) and refuses every other text with a `KeyError` naming it; a key has
exactly one spelling (no leading zeros, no extra slashes). Prefixes for listing and garbage
collection: `round_prefix`, `sync_round_prefix`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional, Union

__all__ = ["HopOutputKey", "PseudogradKey", "StateKey", "PieceKey", "UpdateKey", "ModelKey", "ObjectKey",
           "ParsedKey", "parse_key", "staging_of", "round_prefix", "sync_round_prefix", "stage_prefix",
           "model_key_in"]

_HEX = frozenset("0123456789abcdef")


def round_prefix(run: str, round_: int) -> str:
    """`runs/{run}/r{round}/`: every object of a round (hop outputs, pseudo-gradients, states it starts)."""
    return f"runs/{run}/r{round_}/"


def stage_prefix(run: str, round_: int, stage: int) -> str:
    """`runs/{run}/r{round}/s{stage}/`: every object of one stage's round."""
    return f"{round_prefix(run, round_)}s{stage}/"


def sync_round_prefix(run: str, round_: int) -> str:
    """`runs/{run}/sync/r{round}/`: a sharded round's merged updates (kept while catch-up needs them)."""
    return f"runs/{run}/sync/r{round_}/"


def _staged(final: str, hotkey: str) -> str:
    folder, name = final.rsplit("/", 1)
    return f"{folder}/upload-{hotkey}/{name}"


@dataclass(frozen=True)
class HopOutputKey:
    """A hop's output (`act`: a forward's code, `grad`: a backward's gradient of the code)."""

    run: str
    round: int
    stage: int
    part: Literal["act", "grad"]
    hop_id: str

    @property
    def final(self) -> str:
        """Sealed at `done`; the consumers' GETs read it."""
        return f"{stage_prefix(self.run, self.round, self.stage)}{self.part}/{self.hop_id}"

    @property
    def staging(self) -> str:
        """The producer's presigned PUT."""
        return f"{stage_prefix(self.run, self.round, self.stage)}upload/{self.part}/{self.hop_id}"


@dataclass(frozen=True)
class _ReplicaObject:
    """A replica's whole object of a stage's round: `{part}/{hotkey}-{sha256}` once sealed, its
    own `upload/{hotkey}/{part}-{sha256}` before, under round `round + STAGED_ROUND`."""

    PART: ClassVar[str]
    STAGED_ROUND: ClassVar[int]

    run: str
    round: int
    stage: int
    hotkey: str
    sha256: str

    @property
    def final(self) -> str:
        """Where the bridge copies the reported object."""
        return f"{stage_prefix(self.run, self.round, self.stage)}{self.PART}/{self.hotkey}-{self.sha256}"

    @property
    def staging(self) -> str:
        """The replica's PUT."""
        folder = stage_prefix(self.run, self.round + self.STAGED_ROUND, self.stage)
        return f"{folder}upload/{self.hotkey}/{self.PART}-{self.sha256}"


@dataclass(frozen=True)
class PseudogradKey(_ReplicaObject):
    """A replica's whole pseudo-gradient in a whole-state run."""

    PART: ClassVar[str] = "pg"
    STAGED_ROUND: ClassVar[int] = 0


@dataclass(frozen=True)
class StateKey(_ReplicaObject):
    """A voter's copy of a stage's full state (theta and momentum) for the round it starts; its
    staging key sits under the round it merged (`round - 1`)."""

    PART: ClassVar[str] = "state"
    STAGED_ROUND: ClassVar[int] = -1


@dataclass(frozen=True)
class PieceKey:
    """One shard of a replica's pseudo-gradient in a sharded run (deleted with its round's objects)."""

    run: str
    round: int
    stage: int
    hotkey: str
    shard: int
    sha256: str

    @property
    def final(self) -> str:
        """Where the bridge seals a reported piece."""
        return f"{stage_prefix(self.run, self.round, self.stage)}sync/pg/{self.hotkey}/{self.shard:05d}-{self.sha256}"

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


def _model_name(round_: Optional[int]) -> str:
    return "latest.json" if round_ is None else f"round-{round_:08d}.json"


def model_key_in(folder: str, round_: Optional[int]) -> str:
    """The published model's key under a run's folder as an operator names it (`runs/RUN_ID`)."""
    return f"{folder.strip('/')}/model/{_model_name(round_)}"


@dataclass(frozen=True)
class ModelKey:
    """The bridge's bucket copy of a round's PublishedModel (`round` None: the latest one)."""

    run: str
    round: Optional[int] = None

    @property
    def final(self) -> str:
        """The only form: the bridge writes it directly."""
        return model_key_in(f"runs/{self.run}", self.round)

    @property
    def staging(self) -> str:
        """No writer but the bridge: the final key."""
        return self.final


ObjectKey = Union[HopOutputKey, PseudogradKey, StateKey, PieceKey, UpdateKey, ModelKey]


@dataclass(frozen=True)
class ParsedKey:
    """A key read back: the typed value and whether the text was its staging form."""

    key: ObjectKey
    staging: bool


def _sha(text: str) -> str:
    if len(text) != 64 or not set(text) <= _HEX:
        raise KeyError(f"not a lowercase hex sha256: {text[:80]!r}")
    return text


def _num(text: str, prefix: str) -> int:
    if not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise KeyError(f"expected {prefix}<number>, got {text[:40]!r}")
    return int(text[len(prefix):])


def _name(text: str, what: str) -> str:
    if not text or len(text) > 64:
        raise KeyError(f"not a {what}: {text[:80]!r}")
    return text


def _named(text: str, sep: str = "-") -> tuple[str, str]:
    """`{who}{sep}{sha256}` -> (who, sha256)."""
    who, _, sha = text.rpartition(sep)
    return _name(who, "hotkey"), _sha(sha)


def _shard(text: str) -> int:
    if len(text) != 5 or not text.isdigit():
        raise KeyError(f"a shard index is 5 digits, got {text[:20]!r}")
    return int(text)


def _staging_folder(parts: list[str], hotkey: str) -> None:
    if parts[-2] != f"upload-{hotkey}":
        raise KeyError(f"a staging folder names its writer: upload-{hotkey}, not {parts[-2][:80]!r}")


def _parse_update(run: str, p: list[str]) -> ParsedKey:
    # runs/{run}/sync/r{r}/s{s}/merged/{shard}/[upload-{hk}/]{hk}-{sha}
    if len(p) not in (8, 9) or p[5] != "merged":
        raise KeyError("not a merged-update key")
    hotkey, sha = _named(p[-1])
    if len(p) == 9:
        _staging_folder(p, hotkey)
    return ParsedKey(UpdateKey(run, _num(p[3], "r"), _num(p[4], "s"), _shard(p[6]), hotkey, sha), len(p) == 9)


def _parse_model(run: str, p: list[str]) -> ParsedKey:
    if len(p) != 4:
        raise KeyError("not a published-model key")
    if p[3] == "latest.json":
        return ParsedKey(ModelKey(run), False)
    if not (p[3].startswith("round-") and p[3].endswith(".json")):
        raise KeyError("a model key is round-<8 digits>.json or latest.json")
    return ParsedKey(ModelKey(run, _num(p[3][:-5], "round-")), False)


def _parse_stage(run: str, r: int, s: int, rest: list[str]) -> ParsedKey:
    head, n = rest[0], len(rest)
    if head in ("act", "grad") and n == 2:
        return ParsedKey(HopOutputKey(run, r, s, head, _name(rest[1], "hop id")), False)
    if head == "pg" and n == 2:
        return ParsedKey(PseudogradKey(run, r, s, *_named(rest[1])), False)
    if head == "state" and n == 2:
        return ParsedKey(StateKey(run, r, s, *_named(rest[1])), False)
    if head == "upload" and n == 3 and rest[1] in ("act", "grad"):
        return ParsedKey(HopOutputKey(run, r, s, rest[1], _name(rest[2], "hop id")), True)
    if head == "upload" and n == 3 and rest[2].startswith("pg-"):
        return ParsedKey(PseudogradKey(run, r, s, _name(rest[1], "hotkey"), _sha(rest[2][3:])), True)
    if head == "upload" and n == 3 and rest[2].startswith("state-"):
        return ParsedKey(StateKey(run, r + 1, s, _name(rest[1], "hotkey"), _sha(rest[2][6:])), True)
    if rest[:2] == ["sync", "pg"] and n in (4, 5):
        hotkey = _name(rest[2], "hotkey")
        shard, _, sha = rest[-1].partition("-")
        if n == 5:
            _staging_folder(rest, hotkey)
        return ParsedKey(PieceKey(run, r, s, hotkey, _shard(shard), _sha(sha)), n == 5)
    raise KeyError("no object of a run is stored under this name")


def _parse(p: list[str]) -> ParsedKey:
    if len(p) < 4 or p[0] != "runs" or not p[1]:
        raise KeyError("not under runs/<run>/")
    if p[2] == "sync":
        return _parse_update(p[1], p)
    if p[2] == "model":
        return _parse_model(p[1], p)
    if len(p) < 5:
        raise KeyError("too short for a stage's object")
    return _parse_stage(p[1], _num(p[2], "r"), _num(p[3], "s"), p[4:])


def parse_key(text: str) -> ParsedKey:
    """The typed key `text` spells (final or staging form); KeyError naming the text otherwise."""
    try:
        parsed = _parse(text.split("/"))
    except (KeyError, ValueError) as exc:
        reason = exc.args[0] if exc.args else str(exc)
        raise KeyError(f"{text[:200]!r} is not an object key of a run: {reason}") from None
    spelled = parsed.key.staging if parsed.staging else parsed.key.final
    if spelled != text:  # e.g. a round spelled with leading zeros: one spelling only
        raise KeyError(f"{text[:200]!r} is not an object key of a run: it is spelled {spelled[:200]!r}")
    return parsed


def staging_of(final: str) -> str:
    """The staging key of a final key (KeyError for text that is no final key of a run)."""
    parsed = parse_key(final)
    if parsed.staging:
        raise KeyError(f"{final[:200]!r} is a staging key, not a final one")
    return parsed.key.staging
