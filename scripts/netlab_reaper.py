"""The emulated network's undertaker: a process of its own session that outlives its owner.

The owner (scripts/netlab.py) writes `iface NAME` and `netns INODE` lines to our stdin as it
builds. When stdin closes (the owner closed the network, or died, even by SIGKILL), we give the
processes still inside those namespaces `--grace` seconds to leave (they were sent SIGTERM by
PR_SET_PDEATHSIG), SIGKILL the rest, and delete the host interface; then exit. A namespace whose
last process is gone is freed by the kernel; the interface goes with it, or with us.

    python scripts/netlab_reaper.py --grace 10 < pipe
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

__all__ = ["processes_in", "main"]


def processes_in(inodes: set[int]) -> list[int]:
    """Pids of the live processes whose network namespace is one of `inodes`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def main(argv=None) -> int:
    """Read the owner's lines until EOF, then clear out what it made."""
    p = argparse.ArgumentParser(prog="netlab_reaper", description=__doc__.split("\n")[0])
    p.add_argument("--grace", type=float, default=10.0, help="seconds processes get to leave before SIGKILL")
    a = p.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the owner must not stop the cleanup
    ifaces, inodes = [], set()
    for line in sys.stdin:
        what, _, value = line.strip().partition(" ")
        if what == "iface":
            ifaces.append(value)
        elif what == "netns":
            inodes.add(int(value))
    inodes.discard(os.stat("/proc/self/ns/net").st_ino)  # never the host's own namespace
    end = time.monotonic() + a.grace
    while processes_in(inodes) and time.monotonic() < end:
        time.sleep(0.2)
    _kill(processes_in(inodes), signal.SIGKILL)
    for name in ifaces:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
