"""Read views of the fleet, the same for every reader: ``vetd nodes``, ``vetd node``, the HTTP API, ``vetd up``."""

from __future__ import annotations

import time
from typing import Any

from vetd.controller.model import PendingAction
from vetd.controller.store import Store
from vetd.core.output import table
from vetd.core.protocol import BAD_STATUSES


def node_summaries(store: Store) -> list[dict[str, Any]]:
    pending = {(p.cluster, p.node): p for p in store.pending_actions()}
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
            "pending": pending_view(pending.get((n.cluster, n.name))),
        }
        for n in store.node_rows()
    ]


def pending_view(pending: PendingAction | None) -> dict[str, Any] | None:
    """A drain or resume not yet confirmed by the scheduler, as readers show it (None: there is none)."""
    if pending is None:
        return None
    return {"action": pending.action, "since": pending.since, "attempts": pending.attempts,
            "last_error": pending.last_error, "next_try": pending.next_try}


def pending_text(pending: dict[str, Any], now: float | None = None) -> str:
    """``drain pending: 3 attempts, last error: …, next try in 40s``."""
    if not pending["attempts"]:
        return f"{pending['action']} pending: not tried yet"
    wait = max(0.0, pending["next_try"] - (time.time() if now is None else now))
    return (f"{pending['action']} pending: {pending['attempts']} attempt{'s' if pending['attempts'] != 1 else ''}, "
            f"last error: {pending['last_error']}, next try in {wait:.0f}s")


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
