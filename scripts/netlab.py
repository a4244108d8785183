"""Kernel-emulated links for the local subnet: a hub namespace for the bridge and S3, one
namespace per neuron, each joined to the hub by a shaped link (see scripts/netlab_plan.py).

Shaping is the kernel's `netem` (rate, delay, jitter, loss) where the kernel has it; where it
has not (some VM kernels), the kernel's `tbf` shapes the rate and a delay line (scripts/
delay_line.py, TUN devices) adds the delay, jitter and loss. `probe` says which, or raises
`NetlabUnavailable` with one line where namespaces cannot be made (not root, no iproute2).

Nothing outlives the run: the namespaces are unnamed and held by child processes that the kernel
kills with their parent (PR_SET_PDEATHSIG), and a reaper in a session of its own (scripts/
netlab_reaper.py) waits for the owner to go, however it goes, then SIGKILLs whatever still sits in
those namespaces after a grace period and deletes the host interface; so a SIGKILLed owner leaves no
namespace, interface or qdisc behind. `sweep` removes a host interface whose owner is dead,
should one ever remain (say the reaper was killed too).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from scripts.netlab_plan import (TUN_MTU, LinkShape, NetPlan, link_commands, owner_of, plan,
                                 shaping_commands)

__all__ = ["NetlabUnavailable", "probe", "sweep", "host_ifaces", "NetLab", "enter_netns"]

log = logging.getLogger("netlab")
REPO = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
# A holder: a new network namespace with one process in it, reading its stdin until the owner goes.
_HOLDER = ["unshare", "--net", "--", "sh", "-c", "readlink /proc/self/ns/net && exec cat >/dev/null"]


_ALT = " (bench_network --link-mode process; localnet without --link-netns)"


class NetlabUnavailable(RuntimeError):
    """Kernel links cannot be made here; the message is the one line to show."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _die_with_parent_hard() -> None:
    """preexec_fn: SIGKILL this child when its parent dies (holders and delay lines)."""
    _libc().prctl(1, signal.SIGKILL)


def enter_netns(pid: int, then: Optional[Callable[[], None]] = None) -> Callable[[], None]:
    """A preexec_fn that moves the child into the network namespace of `pid`, then calls `then`."""
    path = f"/proc/{pid}/ns/net"

    def preexec() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _libc().setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
        finally:
            os.close(fd)
        if then is not None:
            then()
    return preexec


def _run(argv: list[str], pid: Optional[int] = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run one command in the namespace of `pid` (the host's when None)."""
    cmd = (["nsenter", f"--net=/proc/{pid}/ns/net", "--"] if pid else []) + argv
    res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(res.stderr or res.stdout).strip()}")
    return res


@dataclass
class _Holder:
    """A child process sitting in its own new network namespace for as long as we keep it."""

    proc: subprocess.Popen
    inode: int

    @classmethod
    def start(cls) -> "_Holder":
        proc = subprocess.Popen(_HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent_hard, text=True)
        line = proc.stdout.readline().strip()
        m = re.fullmatch(r"net:\[(\d+)\]", line)
        if m is None:
            proc.kill()
            proc.wait()
            why = line.removeprefix("unshare: ") or "no answer"
            raise NetlabUnavailable(f"kernel links need root to create network namespaces ({why}); "
                                    "run as root (CAP_NET_ADMIN, CAP_SYS_ADMIN), or use the in-process emulator" + _ALT)
        return cls(proc, int(m.group(1)))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _need_tools() -> None:
    missing = [t for t in ("ip", "tc", "nsenter", "unshare") if shutil.which(t) is None]
    if missing:
        raise NetlabUnavailable(f"kernel links need {', '.join(missing)} (apt-get install -y iproute2 util-linux); "
                                "or use the in-process emulator" + _ALT)


def probe() -> str:
    """'netem' or 'tbf' (the shaping this kernel offers), tried in a throwaway namespace;
    NetlabUnavailable (one line) where namespaces or shaping are impossible."""
    _need_tools()
    h = _Holder.start()
    try:
        _run(["ip", "link", "add", "pa", "type", "veth", "peer", "name", "pb"], h.pid)
        if _run(["tc", "qdisc", "add", "dev", "pa", "root", "netem", "delay", "1ms"], h.pid, check=False).returncode == 0:
            return "netem"
        tbf = _run(["tc", "qdisc", "add", "dev", "pb", "root", "tbf", "rate", "1mbit", "burst", "32kb",
                    "latency", "50ms"], h.pid, check=False)
        if tbf.returncode != 0:
            raise NetlabUnavailable("this kernel has neither the netem nor the tbf qdisc, so links cannot be shaped; "
                                    "use the in-process emulator" + _ALT)
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            raise NetlabUnavailable("this kernel has no netem qdisc and /dev/net/tun is missing, so no delay can be "
                                    "added; use the in-process emulator" + _ALT)
        return "tbf"
    finally:
        h.stop()


def host_ifaces() -> list[str]:
    """Names of the host namespace's interfaces."""
    out = _run(["ip", "-o", "link", "show"]).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep() -> list[str]:
    """Delete host interfaces of emulated networks whose owner process is dead; returns their names."""
    gone = []
    for name in host_ifaces():
        owner = owner_of(name)
        if owner is not None and not _alive(owner):
            if _run(["ip", "link", "del", name], check=False).returncode == 0:
                gone.append(name)
    if gone:
        log.info("removed %d interface(s) left by dead runs: %s", len(gone), ", ".join(gone))
    return gone


def _host_addrs() -> set[str]:
    out = _run(["ip", "-o", "-4", "addr", "show"]).stdout
    return {tok.split("/")[0] for line in out.splitlines() for tok in line.split()[3:4]}


_SEQ = iter(range(10**6))


@dataclass
class NetLab:
    """One emulated network: a hub and `neurons` shaped links. `start()` builds it, `close()` ends it."""

    neurons: int
    shape: LinkShape
    backend: str = "auto"  # auto | netem | tbf
    manifest: Optional[Path] = None
    seed: Optional[int] = None
    plan: Optional[NetPlan] = None
    hub: Optional[_Holder] = None
    holders: list[_Holder] = field(default_factory=list)
    lines: list[subprocess.Popen] = field(default_factory=list)
    reaper: Optional[subprocess.Popen] = None
    grace: float = 10.0  # seconds a neuron gets to leave after its owner died, before the reaper kills it

    def start(self) -> "NetLab":
        """Sweep leftovers, probe the kernel, build the hub and every link; NetlabUnavailable if impossible."""
        _need_tools()
        sweep()
        if self.backend == "auto":
            self.backend = probe()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("kernel links: %d neuron namespace(s), %s (%s); services at %s", self.neurons,
                 self.shape.describe(), self.backend_text, self.plan.services_addr)
        return self

    @property
    def backend_text(self) -> str:
        """What shapes the links, in words."""
        return {"netem": "kernel netem: rate, delay, jitter, loss",
                "tbf": "kernel tbf rate + TUN delay line for delay, jitter, loss (this kernel has no netem)"}[self.backend]

    @property
    def services_addr(self) -> str:
        """The address the bridge and S3 listen on (reachable from the host and every neuron)."""
        return self.plan.services_addr

    def _tell_reaper(self, line: str) -> None:
        self.reaper.stdin.write(line + "\n")
        self.reaper.stdin.flush()

    def _holder(self) -> _Holder:
        h = _Holder.start()
        self._tell_reaper(f"netns {h.inode}")
        return h

    def _build(self) -> None:
        self.plan = p = plan(os.getpid(), next(_SEQ), self.neurons, _host_addrs())
        self.reaper = subprocess.Popen([sys.executable, str(REPO / "scripts" / "netlab_reaper.py"), "--grace",
                                        str(self.grace)], stdin=subprocess.PIPE, text=True, start_new_session=True)
        self._tell_reaper(f"iface {p.host_iface}")
        self.hub = self._holder()
        hub = self.hub.pid
        _run(["ip", "link", "add", p.host_iface, "type", "veth", "peer", "name", "up0", "netns", str(hub)])
        _run(["ip", "addr", "add", p.host_addr, "peer", p.services_addr, "dev", p.host_iface])
        _run(["ip", "link", "set", p.host_iface, "up"])
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "up0", "up"],
                    ["ip", "addr", "add", p.services_addr, "peer", p.host_addr, "dev", "up0"]):
            _run(cmd, hub)
        self._write_manifest()
        for i in range(self.neurons):
            self._link(i)
        self._write_manifest()

    def _link(self, i: int) -> None:
        h = self._holder()
        self.holders.append(h)
        hub_dev, mtu = f"n{i}", 1500
        timed = self.shape.rtt_ms or self.shape.jitter_ms or self.shape.loss
        if self.backend == "netem" or not timed:  # tbf alone shapes a rate-only link: no delay line needed
            _run(["ip", "link", "add", hub_dev, "type", "veth", "peer", "name", "eth0", "netns", str(h.pid)], self.hub.pid)
        else:
            mtu = TUN_MTU
            line = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / "delay_line.py"), "--neuron-ns", f"/proc/{h.pid}/ns/net",
                 "--hub-ns", f"/proc/{self.hub.pid}/ns/net", "--hub-dev", hub_dev, "--rtt-ms", str(self.shape.rtt_ms),
                 "--jitter-ms", str(self.shape.jitter_ms), "--loss", str(self.shape.loss),
                 *(["--seed", str(self.seed + i)] if self.seed is not None else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                preexec_fn=_die_with_parent_hard)
            self.lines.append(line)
            said = line.stdout.readline().strip()
            if said != "ready":
                raise RuntimeError(f"delay line of link {i} did not start: {said or 'no answer'}")
        hub_cmds, neuron_cmds = link_commands(self.plan, i, hub_dev, "eth0", mtu)
        for cmd in hub_cmds + shaping_commands(hub_dev, self.shape, self.backend, mtu):
            _run(cmd, self.hub.pid)
        for cmd in neuron_cmds + shaping_commands("eth0", self.shape, self.backend, mtu):
            _run(cmd, h.pid)

    def neuron_pid(self, i: int) -> int:
        """The holder pid of neuron i's namespace (for nsenter --net=/proc/PID/ns/net)."""
        return self.holders[i].pid

    def in_neuron(self, i: int, then: Optional[Callable[[], None]] = None) -> Callable[[], None]:
        """preexec_fn that starts a child inside neuron i's namespace."""
        return enter_netns(self.neuron_pid(i), then)

    def in_hub(self, then: Optional[Callable[[], None]] = None) -> Callable[[], None]:
        """preexec_fn that starts a child inside the hub namespace (the bridge, S3)."""
        return enter_netns(self.hub.pid, then)

    def _write_manifest(self) -> None:
        if self.manifest is None:
            return
        data = {"owner": os.getpid(), "backend": self.backend, "shape": vars(self.shape),
                "host_iface": self.plan.host_iface, "services_addr": self.plan.services_addr,
                "holders": [h.pid for h in [self.hub, *self.holders] if h],
                "netns_inodes": [h.inode for h in [self.hub, *self.holders] if h],
                "delay_lines": [p.pid for p in self.lines], "reaper": self.reaper.pid if self.reaper else None}
        fd, tmp = tempfile.mkstemp(dir=str(Path(self.manifest).parent))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.manifest)

    def close(self) -> None:
        """End every delay line and namespace (the host interface goes with the hub)."""
        for line in self.lines:
            if line.poll() is None:
                line.kill()
            line.wait()
        for h in self.holders + ([self.hub] if self.hub else []):
            h.stop()
        self.lines, self.holders = [], []
        if self.plan is not None and self.plan.host_iface in host_ifaces():
            # the hub namespace lives on while a process sits in it; the link must not
            _run(["ip", "link", "del", self.plan.host_iface], check=False)
        self.hub = None
        if self.reaper is not None:  # nothing is left for it to do: let it go
            self.reaper.stdin.close()
            self.reaper.wait()
            self.reaper = None
