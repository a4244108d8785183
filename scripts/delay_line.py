"""One emulated link where the kernel has no netem: a pair of TUN devices, one in a neuron's
namespace and one in the hub's, and this process moving packets between them after the link's
one-way delay (with jitter and loss). The rate is shaped by the kernel (`tbf` on both devices);
this process only times packets, it never reorders them.

Started by scripts/netlab.py; it dies with its parent, and the TUN devices die with it.

    python scripts/delay_line.py --neuron-ns /proc/P/ns/net --hub-ns /proc/Q/ns/net \
        --hub-dev n0 --rtt-ms 50 --jitter-ms 0 --loss 0
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import heapq
import os
import random
import select
import struct
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.netlab_plan import TUN_MTU, DelaySchedule, LinkShape

__all__ = ["open_tun", "main"]

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def open_tun(name: str) -> int:
    """A non-blocking fd of a new TUN device `name` in the current network namespace."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def _pump(fds: dict[int, tuple[int, DelaySchedule]], control: int) -> None:
    """Move packets from each fd to its peer at their due times until `control` closes."""
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    while True:
        wait = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        ready, _, _ = select.select([*fds, control], [], [], wait)
        if control in ready and not os.read(control, 4096):
            return  # the owner closed our stdin or died
        now = time.monotonic()
        for fd in ready:
            if fd == control:
                continue
            out, sched = fds[fd]
            while True:
                try:
                    pkt = os.read(fd, TUN_MTU + 64)
                except BlockingIOError:
                    break
                due = sched.due(now)
                if due is not None:
                    heapq.heappush(queue, (due, seq, out, pkt))
                    seq += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _due, _s, out, pkt = heapq.heappop(queue)
            try:
                os.write(out, pkt)
            except (BlockingIOError, OSError):
                pass  # the receiving device is down or full: the packet is lost, as on a wire


def main(argv=None) -> int:
    """Create both devices, say 'ready', then carry packets until the owner goes away."""
    p = argparse.ArgumentParser(prog="delay_line", description=__doc__.split("\n")[0])
    p.add_argument("--neuron-ns", required=True)
    p.add_argument("--hub-ns", required=True)
    p.add_argument("--hub-dev", required=True)
    p.add_argument("--neuron-dev", default="eth0")
    p.add_argument("--rtt-ms", type=float, default=0.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args(argv)
    shape = LinkShape(rtt_ms=a.rtt_ms, jitter_ms=a.jitter_ms, loss=a.loss)
    rng = random.Random(a.seed)
    try:
        _setns(a.neuron_ns)
        neuron = open_tun(a.neuron_dev)
        _setns(a.hub_ns)
        hub = open_tun(a.hub_dev)
    except OSError as exc:
        print(f"error {exc}", flush=True)
        return 1
    print("ready", flush=True)
    _pump({neuron: (hub, DelaySchedule(shape, rng)), hub: (neuron, DelaySchedule(shape, rng))}, sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
