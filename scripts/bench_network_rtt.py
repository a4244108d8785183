"""Round trips per hop, from the miners' own request counters (neurons/request_log.py). Pure.

For each stage and hop kind: how many requests of each route lie on a hop's path (the lease that
handed it out, the input GETs, the output PUT, the `done` report: one after another, so each is a
sequential round trip on the sample's critical path), the bytes they move, what the link alone
adds for them (round trips x RTT + bytes / rate), the seconds they really took, and how much of
that the miner spent computing other hops (overlapped: not idle time for the miner, though still
on the sample's path). Requests that serve no single hop (steps, merges) are totalled per round.
"""
from __future__ import annotations

__all__ = ["ROUTE_COLUMNS", "hop_round_trips", "other_round_trips", "format_rtt_table", "format_other_table"]

ROUTE_COLUMNS = (("lease", "lease"), ("lease_prefetch", "lease ahead"), ("lease_carried", "lease in a report's answer"),
                 ("object_get", "GET in"),
                 ("object_put", "PUT out"), ("hop_done", "done"))
_HOP_ROUTES = {r for r, _ in ROUTE_COLUMNS}


def hop_round_trips(status: dict[str, dict], *, rtt_ms: float, mbps: float) -> list[dict]:
    """Rows per (stage, hop kind), summed over the miners of `status` (name -> status summary)."""
    acc: dict[tuple[int, str], dict] = {}
    for st in status.values():
        req = st.get("requests")
        if not req:
            continue
        for kind, k in req["hop_kinds"].items():
            row = acc.setdefault((st.get("stage", -1), kind), {"hops": 0, "routes": {}})
            row["hops"] += k["hops"]
            for route, t in k["requests"].items():
                r = row["routes"].setdefault(route, {"count": 0, "seconds": 0.0, "overlapped_s": 0.0, "bytes": 0,
                                                     "carried": 0})
                for f in r:
                    r[f] += t.get(f, 0)
    rows = []
    for (stage, kind), row in sorted(acc.items()):
        n = row["hops"]
        if n == 0:
            continue
        per = {route: t["count"] / n for route, t in row["routes"].items() if route != "lease_carried"}
        rts = sum(per.values())
        nbytes = sum(t["bytes"] for t in row["routes"].values()) / n
        seconds = sum(t["seconds"] for t in row["routes"].values()) / n
        overlapped = sum(t["overlapped_s"] for t in row["routes"].values()) / n
        link = rts * rtt_ms / 1000 + (nbytes * 8 / (mbps * 1e6) if mbps > 0 else 0.0)
        carried = sum(t["carried"] for t in row["routes"].values()) / n
        rows.append({"stage": stage, "kind": kind, "hops": n, "per_hop": per, "carried": carried, "round_trips": rts,
                     "bytes": nbytes, "link_s": link, "request_s": seconds, "overlapped_s": overlapped,
                     "overlapped_by_route": {route: (t["overlapped_s"] / t["seconds"] if t["seconds"] > 0 else 0.0)
                                             for route, t in row["routes"].items()}})
    return rows


def other_round_trips(status: dict[str, dict], rounds: int) -> dict[str, float]:
    """Requests per miner per round of every route that serves no single hop (steps, merges, joining)."""
    totals: dict[str, int] = {}
    miners = 0
    for st in status.values():
        req = st.get("requests")
        if not req:
            continue
        miners += 1
        for route, t in req["routes"].items():
            if route not in _HOP_ROUTES:
                totals[route] = totals.get(route, 0) + t["count"]
    if miners == 0 or rounds <= 0:
        return {}
    return {route: c / miners / rounds for route, c in sorted(totals.items())}


def format_rtt_table(label: str, rows: list[dict], *, rtt_ms: float, mbps: float) -> str:
    """Markdown: round trips per hop by route, bytes, link time and what overlaps compute."""
    head = ("| run | stage | hop | hops | " + " | ".join(c for _, c in ROUTE_COLUMNS) +
            f" | round trips/hop | bytes/hop | link s/hop at {rtt_ms:g} ms, {mbps:g} Mbit/s | "
            "request s/hop | overlapped with compute |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(rows):
        cells = []
        for route, _ in ROUTE_COLUMNS:
            if route == "lease_carried":  # no round trip of its own: the share of hops handed out this way
                cells.append(f"{100 * r.get('carried', 0.0):.0f}% of hops")
                continue
            v = r["per_hop"].get(route, 0.0)
            ov = r["overlapped_by_route"].get(route, 0.0)
            cells.append(f"{v:.2f}" + (f" ({100 * ov:.0f}% ovl)" if v else ""))
        frac = r["overlapped_s"] / r["request_s"] if r["request_s"] > 0 else 0.0
        lines.append(f"| {label if i == 0 else ''} | {r['stage']} | {r['kind']} | {r['hops']} | " + " | ".join(cells) +
                     f" | {r['round_trips']:.2f} | {r['bytes']:,.0f} | {r['link_s']:.3f} | {r['request_s']:.3f} | "
                     f"{100 * frac:.0f}% |")
    return "\n".join(lines)


def format_other_table(label: str, per_round: dict[str, float]) -> str:
    """Markdown: per-miner requests per round of the routes outside a hop's path."""
    if not per_round:
        return ""
    head = "| run | " + " | ".join(per_round) + " |"
    return "\n".join([head, "|" + "---|" * (len(per_round) + 1),
                      f"| {label} | " + " | ".join(f"{v:.1f}" for v in per_round.values()) + " |"])
