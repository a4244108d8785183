"""Kernel-emulated links for real: namespaces, shaped links measured end to end, nothing left after
close or after the owner is SIGKILLed, the sweep of dead owners' interfaces, and the one-line
failure without privileges. Needs root (CI runs as root); fails with one line otherwise."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from scripts.netlab import NetLab, host_ifaces, sweep
from scripts.netlab_plan import LinkShape, host_iface
from tests.harness.netns import leftovers, require_netns, wait_nothing_left
from tests.servers import REPO

pytestmark = pytest.mark.timeout(180)

_TCP_SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", 9100)); s.listen()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9101))
import threading
def echo():
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
print("listening", flush=True)
while True:
    c, _ = s.accept(); n = 0; want = int(c.recv(16).decode().strip() or 0)
    while True:
        d = c.recv(1 << 16)
        if not d: break
        n += len(d)
    c.sendall(b"x" * want); c.close()
"""

_TCP_CLIENT = """
import json, socket, sys, time
host, nbytes = sys.argv[1], int(sys.argv[2])
connects = []
for _ in range(5):
    t = time.monotonic(); c = socket.create_connection((host, 9100)); connects.append(time.monotonic() - t)
    c.sendall(b"0".ljust(16)); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
c = socket.create_connection((host, 9100)); c.sendall(str(nbytes).encode().ljust(16))
t = time.monotonic(); c.sendall(b"y" * nbytes); c.shutdown(socket.SHUT_WR)
got, first = 0, None
while True:
    d = c.recv(1 << 16)
    if not d: break
    if first is None: first = time.monotonic()
    got += len(d)
print(json.dumps({"connect": sorted(connects)[2], "up": first - t, "down": time.monotonic() - first, "got": got}))
"""

_UDP_PINGS = """
import json, socket, sys, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.setblocking(False)
n, sent, rtts = int(sys.argv[2]), {}, {}
def collect(until):
    while time.monotonic() < until:
        try:
            d, _ = u.recvfrom(64)
        except BlockingIOError:
            time.sleep(0.0005); continue
        i = int(d)
        rtts.setdefault(i, time.monotonic() - sent[i])
for i in range(n):  # one ping every 3 ms, answers collected as they come
    sent[i] = time.monotonic(); u.sendto(str(i).encode(), (sys.argv[1], 9101))
    collect(time.monotonic() + 0.003)
collect(time.monotonic() + 1.5)
print(json.dumps({"rtts": list(rtts.values()), "lost": n - len(rtts)}))
"""


def _in(lab: NetLab, code: str, *args: str, where: str = "neuron") -> subprocess.CompletedProcess:
    pre = lab.in_neuron(0) if where == "neuron" else lab.in_hub()
    return subprocess.run([sys.executable, "-c", code, *args], preexec_fn=pre, capture_output=True, text=True,
                          timeout=120)


def _server(lab: NetLab) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _TCP_SERVER], preexec_fn=lab.in_hub(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "listening"
    return p


@pytest.fixture(scope="module")
def backend() -> str:
    return require_netns()


def test_shaped_link_adds_its_round_trip_and_caps_its_rate_both_ways(backend, tmp_path):
    rtt, mbps, nbytes = 0.08, 16.0, 2_000_000
    lab = NetLab(1, LinkShape(mbps=mbps, rtt_ms=rtt * 1000), manifest=tmp_path / "netlab.json").start()
    server = _server(lab)
    try:
        res = _in(lab, _TCP_CLIENT, lab.services_addr, str(nbytes))
    finally:
        server.kill()
        lab.close()
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    assert m["got"] == nbytes
    wire = nbytes * 8 / (mbps * 1e6)  # 1.0 s at the configured rate
    # shaping happened (bounded below by the configuration), and the link still carries data
    assert 0.8 * rtt <= m["connect"] < rtt + 2.0, m
    for way in ("up", "down"):
        assert 0.8 * wire <= m[way] < 10 * wire, (way, m)


def test_jitter_and_loss_are_applied_to_every_packet(backend, tmp_path):
    rtt, loss = 0.06, 0.2
    lab = NetLab(1, LinkShape(rtt_ms=rtt * 1000, jitter_ms=40, loss=loss), seed=1).start()
    server = _server(lab)
    try:
        res = _in(lab, _UDP_PINGS, lab.services_addr, "300")
    finally:
        server.kill()
        lab.close()
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)
    # a ping survives both directions with (1 - loss)^2 = 64%: 36% expected lost, far from 0 and 100%
    assert 0.2 < m["lost"] / 300 < 0.55, m["lost"]
    rtts = sorted(m["rtts"])
    assert rtts[0] >= rtt - 0.04 - 0.005  # never below the round trip minus the jitter allowance
    assert rtts[int(0.9 * len(rtts))] - rtts[int(0.1 * len(rtts))] > 0.01, rtts  # it really varies


def test_close_leaves_no_interface_namespace_or_process(backend, tmp_path):
    lab = NetLab(3, LinkShape(mbps=50, rtt_ms=20), manifest=tmp_path / "netlab.json").start()
    manifest = json.loads((tmp_path / "netlab.json").read_text())
    assert manifest["host_iface"] in host_ifaces()
    assert len(manifest["netns_inodes"]) == 4 and len(set(manifest["netns_inodes"])) == 4
    assert leftovers(manifest)  # it exists while open ...
    lab.close()
    wait_nothing_left(tmp_path / "netlab.json", timeout=10)  # ... and is gone at once after


_OWNER = """
import subprocess, sys, time
sys.path.insert(0, {repo!r})
from scripts.local_servers import die_with_parent
from scripts.netlab import NetLab
from scripts.netlab_plan import LinkShape
lab = NetLab(2, LinkShape(mbps=10, rtt_ms=40), manifest={manifest!r}).start()
# a neuron as the cluster starts one: in its namespace, dying with its parent
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], preexec_fn=lab.in_neuron(1, die_with_parent))
print("ready", flush=True)
time.sleep(600)
"""


def test_sigkilled_owner_leaves_nothing_behind(backend, tmp_path):
    path = tmp_path / "netlab.json"
    owner = subprocess.Popen([sys.executable, "-c", _OWNER.format(repo=str(REPO), manifest=str(path))],
                             stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "ready"
    manifest = json.loads(path.read_text())
    assert manifest["owner"] == owner.pid and leftovers(manifest)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    wait_nothing_left(path, timeout=30)


def test_sweep_removes_interfaces_of_dead_owners_only():
    require_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, mine = host_iface(dead.pid, 7), host_iface(os.getpid(), 999)
    for name, peer in ((stale, "rlsweepa"), (mine, "rlsweepb")):
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], check=True)
    try:
        removed = sweep()
        names = host_ifaces()
        assert stale in removed and stale not in names
        assert mine in names and mine not in removed
    finally:
        for name in (stale, mine):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


@pytest.mark.parametrize("argv", [["scripts/bench_network.py", "--configs", "c", "--link-mode", "kernel"],
                                  ["scripts/localnet.py", "--link-netns"]])
def test_without_privileges_kernel_links_fail_with_one_line(argv, tmp_path):
    require_netns()  # as root we can drop to nobody; the failure below is nobody's
    os.chmod(tmp_path, 0o777)
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, *argv,
                          "--workdir", str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, HOME=str(tmp_path)))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 17, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: kernel links need root"), res.stderr[-2000:]
    assert "Traceback" not in res.stdout + res.stderr
    assert not (tmp_path / "w").exists()  # refused before making anything


@pytest.mark.parametrize("shape", [LinkShape(mbps=100, rtt_ms=50, jitter_ms=10, loss=0.001), LinkShape(rtt_ms=150),
                                   LinkShape(mbps=1000, rtt_ms=20)])
def test_netem_lines_pass_tc_s_parser(backend, shape):
    # where the kernel lacks netem (this box), tc still parses the line and only the kernel refuses it
    from scripts.netlab_plan import shaping_commands
    [cmd] = shaping_commands("t0", shape, "netem")
    res = subprocess.run(["unshare", "--net", "sh", "-c", "ip link add t0 type veth peer name t1 && " + " ".join(cmd)],
                         capture_output=True, text=True, timeout=30)
    assert "What is" not in res.stderr and "Usage" not in res.stderr, res.stderr
    assert res.returncode == 0 or "qdisc kind is unknown" in res.stderr, res.stderr
    assert (res.returncode == 0) == (backend == "netem")


def test_auto_link_mode_falls_back_to_the_in_process_emulator_and_says_why(tmp_path):
    require_netns()
    code = ("from scripts.bench_network import build_parser, resolve_link_mode\n"
            "a = build_parser().parse_args(['--link-mode', 'auto'])\n"
            "print(resolve_link_mode(a)); print(a.link_mode)")
    res = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=str(tmp_path)))
    assert res.returncode == 0, res.stderr[-2000:]
    said, mode = res.stdout.strip().splitlines()[-2:]
    assert mode == "process"
    assert said.startswith("link: in-process emulator") and "bridge calls pay nothing" in said and "need root" in said
