"""The pure parts of the kernel-emulated network: names, addresses, link shapes and the exact
`ip` / `tc` command lines, plus the delay line's packet schedule. No I/O here (scripts/netlab.py
runs these).

Topology of one emulated network (one per subnet run):

    host namespace        hub namespace (bridge, S3)          one namespace per neuron
    rl<pid>n<seq>  <-veth->  up0 (services address)
                             n<i>   <-shaped link i->          eth0 (the neuron's only way out)

Only one interface lives in the host namespace, and it dies with the hub namespace; the hub and
neuron namespaces are unnamed and held by processes, so the kernel frees everything when those
processes die, however they die. The owner's pid in the host interface's name lets a later run
sweep a leftover whose owner is gone.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

__all__ = ["LinkShape", "NetPlan", "host_iface", "owner_of", "plan", "shaping_commands",
           "link_commands", "DelaySchedule", "HOST_IFACE_RE", "MAX_NEURONS"]

HOST_IFACE_RE = re.compile(r"^rl(\d+)n(\d+)$")  # rl<owner pid>n<sequence>: at most 15 characters
MAX_NEURONS = 4096
TUN_MTU = 9000  # the delay line's links: jumbo frames keep the packet rate a Python loop can time


@dataclass(frozen=True)
class LinkShape:
    """What one neuron's link does to its traffic, both directions alike.

    `rtt_ms` is the round-trip time the link adds (each direction delays half of it),
    `jitter_ms` the spread of that round trip (each direction varies by up to half of it),
    `loss` the fraction of packets dropped in each direction, `mbps` the rate each way (0: unlimited)."""

    mbps: float = 0.0
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        for name in ("mbps", "rtt_ms", "jitter_ms", "loss"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"link {name} must be a finite number >= 0, got {v!r}")
        if self.loss >= 1:
            raise ValueError(f"link loss is a fraction of packets in [0, 1), got {self.loss!r}")
        if self.jitter_ms > self.rtt_ms:
            raise ValueError(f"link jitter ({self.jitter_ms} ms) cannot exceed the round trip ({self.rtt_ms} ms)")

    @property
    def one_way_ms(self) -> float:
        """Delay each direction adds."""
        return self.rtt_ms / 2

    @property
    def active(self) -> bool:
        """Whether the link shapes anything."""
        return self.mbps > 0 or self.rtt_ms > 0 or self.loss > 0

    def describe(self) -> str:
        """'100 Mbit/s, 50 ms RTT +- 5 ms, 0.1% loss' (what the benchmark prints)."""
        parts = [f"{self.mbps:g} Mbit/s" if self.mbps else "unlimited rate", f"{self.rtt_ms:g} ms RTT"]
        if self.jitter_ms:
            parts[-1] += f" +- {self.jitter_ms / 2:g} ms"
        if self.loss:
            parts.append(f"{100 * self.loss:g}% loss")
        return ", ".join(parts)


def host_iface(owner_pid: int, seq: int) -> str:
    """The one host-namespace interface of network `seq` of process `owner_pid`."""
    name = f"rl{owner_pid}n{seq}"
    if len(name) > 15:
        raise ValueError(f"interface name {name!r} is longer than Linux's 15 characters")
    return name


def owner_of(iface: str) -> int | None:
    """The owner pid encoded in one of our host interface names, or None for anyone else's."""
    m = HOST_IFACE_RE.match(iface)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class NetPlan:
    """Addresses of one emulated network (all /32 point-to-point pairs)."""

    host_iface: str
    host_addr: str  # the host's end of the host <-> hub link
    services_addr: str  # the hub's end: the bridge and S3 listen here
    neurons: int

    def neuron_addr(self, i: int) -> str:
        """Neuron i's address (its end of link i)."""
        self._check(i)
        return f"172.21.{i // 256}.{i % 256}"

    def hub_addr(self, i: int) -> str:
        """The hub's end of link i (the neuron's next hop)."""
        self._check(i)
        return f"172.20.{i // 256}.{i % 256}"

    def _check(self, i: int) -> None:
        if not 0 <= i < self.neurons:
            raise IndexError(f"neuron {i} is not in this plan of {self.neurons}")


def plan(owner_pid: int, seq: int, neurons: int, taken: set[str] = frozenset()) -> NetPlan:
    """The address plan of network `seq` of `owner_pid`; the host link avoids addresses in `taken`
    (the host's current ones), so parallel runs never share a route."""
    if not 0 < neurons <= MAX_NEURONS:
        raise ValueError(f"an emulated network holds 1..{MAX_NEURONS} neurons, got {neurons}")
    # 10.250.0.0/16 and 10.251.0.0/16 hold 32768 host <-> hub pairs (.1 host, .2 hub of each /30)
    start = (owner_pid * 7 + seq) % 32768
    for k in range(32768):
        idx = (start + k) % 32768
        base = f"10.{250 + idx // 16384}.{(idx % 16384) // 64}.{(idx % 64) * 4}"
        a, b, c, d = base.split(".")
        host, hub = f"{a}.{b}.{c}.{int(d) + 1}", f"{a}.{b}.{c}.{int(d) + 2}"
        if host not in taken and hub not in taken:
            return NetPlan(host_iface(owner_pid, seq), host, hub, neurons)
    raise RuntimeError("no free address pair left in 10.250.0.0/15 for an emulated network")


def _rate(mbps: float) -> str:
    return f"{mbps * 1000:.0f}kbit"


def _tbf_burst(mbps: float, mtu: int) -> int:
    # tbf needs a bucket of at least one packet and rate/HZ; 2 ms of rate covers a 250 Hz kernel
    return max(2 * mtu, int(mbps * 1e6 / 8 * 0.002))


def shaping_commands(dev: str, shape: LinkShape, backend: str, mtu: int = 1500) -> list[list[str]]:
    """The `tc` lines that shape one direction (the egress of `dev`) of a link.

    backend 'netem': rate, delay, jitter and loss all in the kernel's netem qdisc.
    backend 'tbf': the rate alone in the kernel (token bucket); the delay line times the rest."""
    if not shape.active:
        return []
    if backend == "netem":
        cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "netem"]
        if shape.rtt_ms:
            cmd += ["delay", f"{shape.one_way_ms:g}ms"]
            if shape.jitter_ms:
                cmd += [f"{shape.jitter_ms / 2:g}ms"]
        if shape.loss:
            cmd += ["loss", f"{100 * shape.loss:g}%"]
        if shape.mbps:
            cmd += ["rate", _rate(shape.mbps)]
        # netem's own queue must hold a bandwidth-delay product of packets, or it drops them
        bdp = shape.mbps * 1e6 / 8 * (shape.rtt_ms + shape.jitter_ms) / 1000 / mtu if shape.mbps else 0
        cmd += ["limit", str(max(1000, int(4 * bdp)))]
        return [cmd]
    if backend == "tbf":
        if not shape.mbps:
            return []
        return [["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", _rate(shape.mbps),
                 "burst", str(_tbf_burst(shape.mbps, mtu)), "latency", "400ms"]]
    raise ValueError(f"unknown shaping backend {backend!r}; expected 'netem' or 'tbf'")


def link_commands(p: NetPlan, i: int, hub_dev: str, neuron_dev: str, mtu: int) -> tuple[list[list[str]], list[list[str]]]:
    """(`ip` lines to run in the hub, lines to run in neuron i's namespace) that address and route
    link i once both ends exist."""
    hub = [["ip", "link", "set", hub_dev, "mtu", str(mtu), "up"],
           ["ip", "addr", "add", p.hub_addr(i), "peer", p.neuron_addr(i), "dev", hub_dev]]
    neuron = [["ip", "link", "set", "lo", "up"],
              ["ip", "link", "set", neuron_dev, "mtu", str(mtu), "up"],
              ["ip", "addr", "add", p.neuron_addr(i), "peer", p.hub_addr(i), "dev", neuron_dev],
              ["ip", "route", "add", "default", "via", p.hub_addr(i), "dev", neuron_dev]]
    return hub, neuron


class DelaySchedule:
    """When each packet of one direction leaves the delay line: a one-way delay with uniform jitter,
    never earlier than the packet before it (no reordering), or None for a lost packet."""

    def __init__(self, shape: LinkShape, rng: random.Random | None = None):
        self.delay = shape.one_way_ms / 1000
        self.jitter = shape.jitter_ms / 2000
        self.loss = shape.loss
        self.rng = rng or random.Random()
        self._last = float("-inf")

    def due(self, now: float) -> float | None:
        """Departure time of a packet that arrived at `now`, or None if the link loses it."""
        if self.loss and self.rng.random() < self.loss:
            return None
        t = now + self.delay + (self.rng.uniform(-self.jitter, self.jitter) if self.jitter else 0.0)
        self._last = max(t, self._last)
        return self._last
