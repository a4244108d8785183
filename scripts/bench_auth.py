"""Benchmark: how many signed requests the bridge's one auth path verifies per second.

    python scripts/bench_auth.py [--requests 2000] [--repeats 3]

Signs N requests (sr25519, as miners do), then verifies each with `protocol.auth.verify_request`
against a `BufferedNonceStore` (signature, freshness, and the nonce's first use), and prints one
row per repeat and the median. The verification is what every bridge request pays before its
handler runs (docs/SECURITY.md)."""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bittensor.sp_core import Keypair  # noqa: E402

from bridge.nonces import BufferedNonceStore  # noqa: E402
from protocol.auth import sign_headers, verify_request  # noqa: E402
from protocol.routes import route  # noqa: E402

PATH = route("hop_done").path  # a miner's most frequent request


def verify_rate(n: int, folder: Path) -> float:
    """Verifications per second of `n` freshly signed requests (one nonce store per call)."""
    alice, bob = Keypair.create_from_uri("//Alice"), Keypair.create_from_uri("//Bob")
    signed = [sign_headers(alice, "POST", PATH, b"{}", bob.ss58_address) for _ in range(n)]
    store = BufferedNonceStore(folder / f"nonces-{time.monotonic_ns()}.db")
    try:
        t0 = time.perf_counter()
        for h in signed:
            verify_request(h, b"{}", method="POST", path=PATH, receiver_ss58=bob.ss58_address,
                           nonce_store=store)
        return n / (time.perf_counter() - t0)
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="signed requests verified per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats (the median is reported)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        rates = [verify_rate(a.requests, Path(d)) for _ in range(a.repeats)]
    print("| repeat | requests | verifications/s |\n|---|---|---|")
    for i, r in enumerate(rates):
        print(f"| {i} | {a.requests} | {r:.0f} |")
    print(f"| median | | {statistics.median(rates):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
