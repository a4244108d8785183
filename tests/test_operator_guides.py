"""The local path of each operator guide, executed: the shell blocks between the
`local-guide:start/end` markers of docs/RUNNING_A_SUBNET.md, docs/MINING.md and docs/VALIDATING.md
run in order in one working directory (```bash blocks to completion, ```bash background blocks
as long-running processes), against real servers: rclone S3, a LocalChain file, the bridge, two
miners and a validator. The only edit is the ports (8600 and 9000 become free ones), so a guide
that drifts from the code fails here."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

GUIDES = ("RUNNING_A_SUBNET.md", "MINING.md", "VALIDATING.md")
_SECTION = re.compile(r"<!-- local-guide:start -->(.*?)<!-- local-guide:end -->", re.S)
_BLOCK = re.compile(r"^```(bash(?: background)?)\n(.*?)^```$", re.S | re.M)


def guide_blocks(doc: str) -> list[tuple[bool, str]]:
    """(is_background, script) for each shell block of the doc's local section, in order."""
    text = (REPO / "docs" / doc).read_text()
    sections = _SECTION.findall(text)
    assert len(sections) == 1, f"{doc}: expected one local-guide section"
    return [(kind == "bash background", body) for kind, body in _BLOCK.findall(sections[0])]


def test_each_guide_has_a_local_path_and_a_testnet_path():
    for doc in GUIDES:
        text = (REPO / "docs" / doc).read_text()
        assert guide_blocks(doc), doc
        assert "## On testnet" in text and "--subtensor.network test" in text, doc


def _wait_for(path: Path, needle: str, timeout: float, procs: list) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        if needle in text:
            return text
        # servers must stay up; a miner may finish with the run (exit 0), never fail
        dead = [(p.args, p.returncode) for i, (p, _) in enumerate(procs) if p.poll() is not None
                and (i not in (2, 3) or p.returncode != 0)]
        assert not dead, f"a guide process exited early: {dead}"
        time.sleep(1.0)
    raise AssertionError(f"{path.name} never said {needle!r}:\n{text[-3000:]}")


def test_local_guides_run_end_to_end(tmp_path):
    work = tmp_path / "resbm-local"
    work.mkdir()
    ports = {"8600": str(free_port()), "9000": str(free_port())}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESBM_")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               PYTHONPATH=str(REPO), HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1",
               BTCLI_TOKEN_SYMBOLS_CACHE=str(tmp_path / "symbols.json"))
    procs: list[tuple[subprocess.Popen, Path]] = []
    try:
        for doc in GUIDES:
            for i, (background, script) in enumerate(guide_blocks(doc)):
                for old, new in ports.items():
                    script = script.replace(old, new)
                if background:
                    log = work / f"{doc.split('.')[0].lower()}-{i}.log"
                    with open(log, "wb") as out:
                        p = subprocess.Popen(["bash", "-c", script], cwd=work, env=env, stdout=out,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
                    procs.append((p, log))
                    continue
                r = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env,
                                   capture_output=True, text=True, timeout=180)
                assert r.returncode == 0, f"{doc} block {i} failed:\n{script}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        bridge_log, miner_logs, validator_log = procs[1][1], [procs[2][1], procs[3][1]], procs[4][1]
        for log in miner_logs:
            _wait_for(log, "serving stage", 120, procs)
        text = _wait_for(validator_log, "weights set at block", 300, procs)
        assert "PASS" in text, text[-3000:]
        for p, _ in procs[2:4]:  # Ctrl-C the miners still running (the run may be over)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGINT)
        for (p, log) in procs[2:4]:  # either way they told the bridge they were leaving
            p.wait(timeout=60)
            assert "told the bridge we are leaving" in log.read_text(), log.read_text()[-2000:]
    finally:
        for p, _ in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p, _ in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
    for _, log in procs:
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]
    from protocol.chain import LocalChain
    chain = LocalChain(work / "chain.db", netuid=1)
    try:
        incentives = chain.incentives()
        miners = [n.uid for n in chain.metagraph().neurons if n.stake == 0 and n.uid != 0]
    finally:
        chain.close()
    assert len(miners) == 2 and all(incentives.get(uid, 0) > 0 for uid in miners), incentives
    assert bridge_log.exists()
