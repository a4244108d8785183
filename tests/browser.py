"""A real headless Chromium (Debian's `chromium`) driven over the DevTools protocol, for page tests.

    with Browser(tmp_path) as b:
        b.open("http://127.0.0.1:8600/")
        b.wait_for("document.body.dataset.generatedAt")
        b.screenshot(path)

No browser download: it runs the system's chromium. Absent, it raises `BrowserMissing` with the
command that installs it (tests fail on that, they do not skip).
"""
from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import connect

__all__ = ["Browser", "BrowserMissing", "find_chromium"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserMissing(RuntimeError):
    """No Chromium on PATH."""


def find_chromium() -> str:
    """Path of a Chromium binary, or BrowserMissing naming the fix."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise BrowserMissing("no chromium on PATH: install it with `apt-get install -y chromium` "
                         "(.ci/run does this on a fresh machine)")


class Browser:
    """One headless Chromium process and a DevTools session on its first page."""

    def __init__(self, profile_dir: Path, width: int = 1280, height: int = 900) -> None:
        self.profile = Path(profile_dir)
        self.size = (width, height)
        self._ids = itertools.count(1)

    def __enter__(self) -> "Browser":
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [find_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
             f"--user-data-dir={self.profile}", f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise RuntimeError(f"chromium did not start (exit {self.proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20)
        return self

    def send(self, method: str, **params: Any) -> dict:
        """One DevTools command; returns its result (raises on a protocol error)."""
        mid = next(self._ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == mid:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def open(self, url: str) -> None:
        """Navigate and wait for the load event's document."""
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def eval(self, expression: str) -> Any:
        """Value of a JavaScript expression in the page (JSON-serialisable)."""
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails'].get('text')}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll until `expression` is truthy; returns its value."""
        end = time.monotonic() + timeout
        while True:
            v = self.eval(expression)
            if v:
                return v
            if time.monotonic() > end:
                raise TimeoutError(f"page never satisfied {expression!r}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> None:
        """Save a PNG of the whole page."""
        h = int(self.eval("document.documentElement.scrollHeight"))
        self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=max(h, 200),
                  deviceScaleFactor=1, mobile=False)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Close the session and stop the browser."""
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.close()
