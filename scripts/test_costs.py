"""What each test file costs: CPU seconds (user + system of the whole process tree) and wall seconds.

    .venv/bin/python scripts/test_costs.py                 # every tests/test_*.py, one pytest each
    .venv/bin/python scripts/test_costs.py tests/test_auth.py tests/test_codec.py --json costs.json

Each file runs in its own `pytest` process, one after another, so the CPU time of the servers,
miners and subprocesses it starts is counted with it (every process the tree waited for). CPU
seconds are what a loaded machine inflates least; wall seconds show waiting (sleeps, timeouts).
The table is sorted by CPU seconds, heaviest first; the last line sums both.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure(path: Path, timeout: float) -> dict:
    """Run one test file; its CPU and wall seconds, outcome and pytest's summary line."""
    cpu0, t0 = _children_cpu(), time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path)],
                              cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, tail = proc.returncode, (proc.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        rc, tail = -1, f"killed after {timeout:.0f}s"
    return {"file": str(path.relative_to(REPO)), "cpu_s": round(_children_cpu() - cpu0, 1),
            "wall_s": round(time.monotonic() - t0, 1), "rc": rc, "summary": tail[:100]}


def main(argv: list[str] | None = None) -> int:
    """Measure the files given (default: every tests/test_*.py) and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", help="test files (default: tests/test_*.py)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one file may take")
    args = p.parse_args(argv)
    files = [Path(f).resolve() for f in args.files] or sorted((REPO / "tests").glob("test_*.py"))
    rows = []
    for f in files:
        rows.append(measure(f, args.timeout))
        r = rows[-1]
        print(f"{r['cpu_s']:8.1f} {r['wall_s']:8.1f}  {r['file']}  {r['summary']}", file=sys.stderr, flush=True)
    rows.sort(key=lambda r: -r["cpu_s"])
    print(f"{'cpu s':>8} {'wall s':>8}  file")
    for r in rows:
        mark = "" if r["rc"] == 0 else f"   FAILED ({r['summary']})"
        print(f"{r['cpu_s']:8.1f} {r['wall_s']:8.1f}  {r['file']}{mark}")
    print(f"{sum(r['cpu_s'] for r in rows):8.1f} {sum(r['wall_s'] for r in rows):8.1f}  total ({len(rows)} files)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
