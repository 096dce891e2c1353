"""Read views of the fleet, the same for every reader: ``vetd nodes``, ``vetd node``, the HTTP API, ``vetd up``."""

from __future__ import annotations

import time
from typing import Any

from vetd.controller.store import Store
from vetd.core.output import table
from vetd.core.protocol import BAD_STATUSES


def node_summaries(store: Store) -> list[dict[str, Any]]:
    failing: dict[tuple[str, str], list[str]] = {}
    for row in store.latest():
        if row["status"] in BAD_STATUSES:
            entity = "" if row["entity"] == "node" else f"[{row['entity']}]"
            failing.setdefault((row["cluster"], row["node"]), []).append(f"{row['check_name']}{entity}")
    return [
        {
            "cluster": n.cluster,
            "node": n.name,
            "state": n.state,
            "online": n.online,
            "last_seen": n.last_seen,
            "failing": sorted(failing.get((n.cluster, n.name), [])),
            "reason": n.reason,
            "labels": n.labels,
            "delivery": store.delivery(n.cluster, n.name),
        }
        for n in store.node_rows()
    ]


def ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def format_nodes(summaries: list[dict[str, Any]]) -> str:
    headers = ("NODE", "STATE", "ONLINE", "LAST SEEN", "FAILING", "REASON")
    many_clusters = len({s["cluster"] for s in summaries}) > 1
    rows = [
        (
            f"{s['cluster']}/{s['node']}" if many_clusters else s["node"],
            s["state"],
            "yes" if s["online"] else "no",
            ago(s["last_seen"]),
            ",".join(s["failing"]) or "-",
            s["reason"] or "-",
        )
        for s in summaries
    ]
    return table(headers, rows)
