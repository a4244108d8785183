"""Change tracking for the persisted records, done once, by the records and their containers.

A `Tracked` record (miner, sample, hop) that belongs to a state notes itself in the state's
journal (`State.dirty`) whenever one of its fields is assigned; a `RecordMap` adopts every
record put into it (and notes it); an `OwnedDict` field notes its owner on every change. So a
transition only assigns; nothing it changes can miss the next commit. The state's global
fields are not tracked here: the database diffs their serialized form at each commit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Protocol, TypeVar

__all__ = ["Journal", "Tracked", "record", "RecordMap", "OwnedDict", "row_json"]

T = TypeVar("T")


class Journal(Protocol):
    """What a record reports its changes to (the state): `dirty[(kind, id)] = record`."""

    dirty: dict


class Tracked:
    """Base of a persisted record (declared with `@record`): assigning a field, or changing an
    `OWNED` dict field in place, marks it changed once a state has adopted it."""

    KIND: ClassVar[str] = ""              # the journal's kind ("miner", "sample", "hop")
    OWNED: ClassVar[tuple[str, ...]] = ()  # dict fields whose in-place changes are tracked

    @property
    def ident(self) -> Any:
        """The record's primary key."""
        raise NotImplementedError

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__
        if name in self.OWNED and not isinstance(value, OwnedDict):
            value = OwnedDict(self, value)
        d[name] = value
        key = d.get("_key")
        if key is not None:
            d["_journal"].dirty[key] = self

    def changed(self) -> None:
        """Note an in-place change of a field (called by the field's own container)."""
        key = self.__dict__.get("_key")
        if key is not None:
            self.__dict__["_journal"].dirty[key] = self

    def adopt(self, journal: Journal) -> None:
        """Belong to `journal`'s state: every later change is noted there (and this one too)."""
        key = (self.KIND, self.ident)
        self.__dict__.update(_journal=journal, _key=key)
        journal.dirty[key] = self

    def __copy__(self) -> "Tracked":
        # a copy handed out of the lock is a detached snapshot: changing it changes nothing
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.pop("_journal", None)
        new.__dict__.pop("_key", None)
        return new

    def row(self) -> dict[str, Any]:
        """The persisted fields, by name, in field order (what `from_row` reads back)."""
        d = self.__dict__.copy()  # the dataclass fields, then (once adopted) journal and key
        d.pop("_journal", None)
        d.pop("_key", None)
        return d


def record(cls: type[T]) -> type[T]:
    """`@dataclass` for a `Tracked` record: `__init__` stores the fields directly (a new record
    is noted when a state adopts it), later assignments are tracked."""
    # frozen=True makes the generated __init__ store with object.__setattr__ (documented
    # dataclass behaviour), skipping the tracking hook 27 times per hop; the hook is put back
    # as the class's __setattr__ right after, so instances are not frozen
    if getattr(cls, "OWNED", ()):
        def __post_init__(self: Any) -> None:
            for name in self.OWNED:
                object.__setattr__(self, name, OwnedDict(self, getattr(self, name)))
        cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    made = dataclass(eq=False, frozen=True)(cls)
    made.__setattr__ = Tracked.__setattr__  # type: ignore[method-assign]
    made.__delattr__ = object.__delattr__  # type: ignore[method-assign]
    return made


class RecordMap(dict):
    """id -> record map of a state: every record put in is adopted by the state's journal."""

    def __init__(self, journal: Journal, items: Iterable[tuple[Any, Tracked]] = ()) -> None:
        super().__init__()
        self._journal = journal
        for k, v in dict(items).items():
            self[k] = v

    def __setitem__(self, key: Any, rec: Tracked) -> None:
        rec.adopt(self._journal)
        super().__setitem__(key, rec)

    def setdefault(self, key: Any, default: Any = None) -> Any:  # pragma: no cover - unused
        if key not in self:
            self[key] = default
        return self[key]

    def update(self, *args: Any, **kw: Any) -> None:
        for k, v in dict(*args, **kw).items():
            self[k] = v


class OwnedDict(dict):
    """A dict field of a tracked record: any change marks the owner changed."""

    def __init__(self, owner: Tracked, items: Any = ()) -> None:
        super().__init__(items)
        self._owner = owner

    def _changed(self) -> None:
        self._owner.changed()

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, key: Any, *default: Any) -> Any:
        had = key in self
        out = super().pop(key, *default)
        if had:
            self._changed()
        return out

    def popitem(self) -> tuple[Any, Any]:
        out = super().popitem()
        self._changed()
        return out

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args: Any, **kw: Any) -> None:
        super().update(*args, **kw)
        self._changed()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> "OwnedDict":
        self.update(other)
        return self


def row_json(rec: Tracked) -> str:
    """The record as its stored JSON row (`rec.row()`; enums are their strings)."""
    return json.dumps(rec.row(), separators=(",", ":"))
