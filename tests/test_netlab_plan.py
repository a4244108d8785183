"""The pure parts of the kernel-emulated network: names, address plan, tc lines, delay schedule."""
from __future__ import annotations

import random

import pytest

from scripts.netlab_plan import (DelaySchedule, LinkShape, host_iface, link_commands, owner_of, plan,
                                 shaping_commands)


def test_host_interface_names_fit_linux_and_carry_their_owner():
    name = host_iface(4194304, 999)  # the largest pid Linux hands out
    assert len(name) <= 15
    assert owner_of(name) == 4194304
    assert owner_of(host_iface(12, 0)) == 12
    for other in ("eth0", "lo", "rl12", "rl12n", "xrl12n0", "rl12n0x", "veth1234"):
        assert owner_of(other) is None, other
    with pytest.raises(ValueError, match="15 characters"):
        host_iface(4194304, 10**6)


def test_address_plan_gives_every_neuron_its_own_pair_and_avoids_taken_host_addresses():
    p = plan(1234, 0, 300)
    addrs = [p.neuron_addr(i) for i in range(300)] + [p.hub_addr(i) for i in range(300)]
    assert len(set(addrs)) == 600
    assert p.services_addr != p.host_addr and p.host_addr.startswith("10.25")
    again = plan(1234, 0, 300, taken={p.host_addr})
    assert again.host_addr != p.host_addr and again.services_addr != p.services_addr
    assert plan(1235, 0, 2).host_addr != p.host_addr  # another owner: another pair
    with pytest.raises(IndexError):
        p.neuron_addr(300)
    with pytest.raises(ValueError, match="1..4096"):
        plan(1, 0, 0)


def test_netem_line_shapes_rate_delay_jitter_and_loss_per_direction():
    shape = LinkShape(mbps=100, rtt_ms=50, jitter_ms=10, loss=0.001)
    [cmd] = shaping_commands("eth0", shape, "netem")
    assert cmd[:7] == ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem"]
    line = " ".join(cmd)
    assert "delay 25ms 5ms" in line  # half the round trip each way, half the jitter
    assert "loss 0.1%" in line and "rate 100000kbit" in line
    limit = int(cmd[cmd.index("limit") + 1])
    assert limit >= 1000  # holds a bandwidth-delay product of packets (100 Mbit/s x 60 ms = 500 packets)


def test_tbf_line_shapes_the_rate_only_and_nothing_for_an_unshaped_link():
    [cmd] = shaping_commands("n3", LinkShape(mbps=50, rtt_ms=150), "tbf", mtu=9000)
    assert cmd[:7] == ["tc", "qdisc", "replace", "dev", "n3", "root", "tbf"]
    assert cmd[cmd.index("rate") + 1] == "50000kbit"
    assert int(cmd[cmd.index("burst") + 1]) >= 2 * 9000  # at least one packet per bucket
    assert shaping_commands("n3", LinkShape(rtt_ms=50), "tbf") == []  # delay alone: the delay line's job
    assert shaping_commands("n3", LinkShape(), "netem") == []
    with pytest.raises(ValueError, match="unknown shaping backend"):
        shaping_commands("n3", LinkShape(mbps=1), "htb")


def test_link_commands_route_the_neuron_only_through_its_hub_end():
    p = plan(77, 1, 3)
    hub, neuron = link_commands(p, 2, "n2", "eth0", 1500)
    assert ["ip", "addr", "add", p.hub_addr(2), "peer", p.neuron_addr(2), "dev", "n2"] in hub
    assert ["ip", "route", "add", "default", "via", p.hub_addr(2), "dev", "eth0"] in neuron
    assert ["ip", "link", "set", "lo", "up"] in neuron


@pytest.mark.parametrize("bad", [dict(mbps=-1), dict(rtt_ms=float("nan")), dict(loss=1.0), dict(loss=-0.1),
                                 dict(rtt_ms=10, jitter_ms=20)])
def test_bad_link_shapes_are_refused(bad):
    with pytest.raises(ValueError, match="link"):
        LinkShape(**bad)


def test_link_shape_describes_itself():
    assert LinkShape(mbps=100, rtt_ms=50).describe() == "100 Mbit/s, 50 ms RTT"
    assert LinkShape(rtt_ms=20, jitter_ms=4, loss=0.01).describe() == "unlimited rate, 20 ms RTT +- 2 ms, 1% loss"


def test_delay_schedule_delays_by_half_the_round_trip_and_never_reorders():
    s = DelaySchedule(LinkShape(rtt_ms=100, jitter_ms=80), random.Random(3))
    dues = [s.due(t / 1000) for t in range(0, 2000, 1)]  # a packet every millisecond
    assert dues == sorted(dues)
    waits = [d - t / 1000 for d, t in zip(dues, range(0, 2000, 1))]
    assert min(waits) >= 0.05 - 0.04 - 1e-9 and max(waits) <= 0.05 + 0.04 + 1e-9
    assert max(waits) - min(waits) > 0.02  # the jitter is really there
    plain = DelaySchedule(LinkShape(rtt_ms=50))
    assert plain.due(1.0) == pytest.approx(1.025)


def test_delay_schedule_loses_the_configured_fraction():
    s = DelaySchedule(LinkShape(rtt_ms=10, loss=0.2), random.Random(7))
    lost = sum(s.due(i * 1e-3) is None for i in range(20000))
    assert 0.18 < lost / 20000 < 0.22
    keep = DelaySchedule(LinkShape(rtt_ms=10), random.Random(7))
    assert all(keep.due(i * 1e-3) is not None for i in range(2000))
