"""The network benchmark on kernel links, as a real process: every miner sits in its own namespace,
the bridge and S3 in the hub, bridge calls pay the shaped round trip as well as object transfers
(read from the miners' request counters), and a SIGKILL mid-run leaves nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.harness.netns import require_netns, wait_nothing_left
from tests.servers import REPO

pytestmark = pytest.mark.timeout(300)
RTT = 0.2


def _procs_mentioning(text: str) -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out[int(entry)] = cmd
    return out


def _netns(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _busy_status(logs) -> dict:
    for p in sorted(logs.glob("miner*.status.json")):
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if st.get("hops_done", 0) >= 2 and st.get("requests", {}).get("routes", {}).get("hop_done"):
            return st
    return {}


def test_sigkilled_benchmark_on_kernel_links_leaves_nothing_and_bridge_calls_paid_the_link(tmp_path):
    require_netns()
    work = tmp_path / "bench"
    bench = subprocess.Popen(
        [sys.executable, "scripts/bench_network.py", "--configs", "c", "--link-mode", "kernel", "--workdir", str(work),
         "--rounds", "50", "--micro-batches", "2", "--inner-steps", "2", "--d-model", "32", "--ratio", "8",
         "--layers", "2", "--stage-layers", "1,1", "--heads", "2", "--seq-len", "16", "--batch-size", "2",
         "--link-mbps", "50", "--link-latency-ms", str(RTT * 1000)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest_path, logs = work / "c" / "netlab.json", work / "c" / "logs"
    try:
        end, status = time.monotonic() + 200, {}
        while time.monotonic() < end and bench.poll() is None and not status:
            time.sleep(1.0)
            status = _busy_status(logs)
        assert status, f"no miner got to work: {bench.poll()}"
        manifest = json.loads(manifest_path.read_text())
        procs = _procs_mentioning(str(work))
        miners = [p for p, cmd in procs.items() if "neurons/miner.py" in cmd]
        bridge = [p for p, cmd in procs.items() if " -m bridge " in cmd]
        hub, *neurons = manifest["netns_inodes"]
        # each miner alone in its own namespace, the bridge in the hub: none of them in the host's
        assert len(miners) == 2 and sorted(_netns(p) for p in miners) == sorted(neurons)
        assert [_netns(p) for p in bridge] == [hub]
        routes = status["requests"]["routes"]
        for route in ("hop_done", "object_put", "register"):  # bridge calls and S3 transfers alike
            t = routes[route]
            assert t["seconds"] / t["count"] >= 0.8 * RTT, (route, t)
    finally:
        bench.send_signal(signal.SIGKILL)  # the crash: no cleanup code of the benchmark runs
        out = bench.communicate()[0]
    wait_nothing_left(manifest_path, timeout=60)
    end = time.monotonic() + 60
    while _procs_mentioning(str(work)) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _procs_mentioning(str(work)), (_procs_mentioning(str(work)), out[-2000:])
