"""Helpers for tests of kernel-emulated links: demand namespaces (fail with one line where they
cannot be made, never skip), and find what an emulated network left behind."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from scripts.netlab import NetlabUnavailable, host_ifaces, probe

__all__ = ["require_netns", "leftovers", "wait_nothing_left"]


def require_netns() -> str:
    """The shaping backend of this kernel; fails the test with one line where namespaces are impossible
    (these tests need root: CI runs as root)."""
    try:
        return probe()
    except NetlabUnavailable as exc:
        pytest.fail(f"kernel-link test needs network namespaces: {exc}", pytrace=False)


def _netns_users(inodes: set[int]) -> dict[int, list[int]]:
    users: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ino = os.stat(f"/proc/{entry}/ns/net").st_ino
        except OSError:
            continue
        if ino in inodes:
            users.setdefault(ino, []).append(int(entry))
    return users


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][:1] != "Z"  # a zombie holds nothing
    except OSError:
        return False


def leftovers(manifest: dict) -> list[str]:
    """What of the emulated network in `manifest` (scripts/netlab.py's netlab.json) still exists."""
    left = []
    if manifest["host_iface"] in host_ifaces():
        left.append(f"host interface {manifest['host_iface']}")
    for pid in manifest["holders"] + manifest["delay_lines"] + ([manifest["reaper"]] if manifest.get("reaper") else []):
        if _alive(pid):
            left.append(f"process {pid}")
    for ino, pids in _netns_users(set(manifest["netns_inodes"])).items():
        live = [p for p in pids if _alive(p)]
        if live:
            left.append(f"namespace {ino} (processes {live})")
    return left


def wait_nothing_left(manifest_path: Path, timeout: float = 60.0) -> dict:
    """Poll until nothing of the network in `manifest_path` remains; fail listing what does."""
    manifest = json.loads(Path(manifest_path).read_text())
    end = time.monotonic() + timeout
    while True:
        left = leftovers(manifest)
        if not left or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert not left, f"left behind after {timeout:.0f}s: {left}"
    return manifest
