"""The localnet's working folder: made by the tool, marked, and the only thing it ever wipes."""
from __future__ import annotations

import shutil
from pathlib import Path

from protocol.exits import Exit, Misconfigured

__all__ = ["MARKER", "prepare_workdir"]

MARKER = ".resbm-localnet"
"""File the localnet writes into a folder it uses; only folders holding it are wiped on reuse."""


def prepare_workdir(path: str | Path) -> Path:
    """An empty working folder at `path`: created if missing; a folder with the marker (a
    previous localnet run) has its contents removed; an empty folder is adopted. Any other
    existing folder or file is refused with `Misconfigured`: the tool never deletes what it did
    not create (`--workdir .` must not wipe a checkout)."""
    workdir = Path(path).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise Misconfigured(Exit.USAGE, f"--workdir {workdir} is a file; give a folder")
    if workdir.is_dir():
        entries = list(workdir.iterdir())
        if entries and not (workdir / MARKER).is_file():
            raise Misconfigured(Exit.USAGE, (
                f"--workdir {workdir} holds {len(entries)} entries that localnet did not create; "
                "give a new or empty folder (localnet only ever wipes folders it made)"))
        for entry in entries:  # a previous run's outputs: the marker says they are ours
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by scripts/localnet.py; its contents are wiped on the next run\n")
    return workdir
