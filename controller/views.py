"""Read views of the fleet, the same for every reader: ``vetd nodes``, ``vetd node``, ``vetd jobs``,
``vetd job``, the HTTP API, ``vetd up``."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from vetd.controller.model import PendingAction
from vetd.controller.store import Store
from vetd.core.output import clean, table
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


# -- jobs: `vetd jobs`, `vetd job`, GET /api/v1/jobs -------------------------------


def attribution(job: dict[str, Any]) -> dict[str, Any]:
    """What a job's outcome points at, from what its nodes showed while it ran:

    ``running``; ``ok`` (it did not fail); ``nodes`` (it failed, and these nodes showed something
    while the others showed nothing, or its one node did: the failure is theirs); ``spread`` (it
    failed and every one of its nodes showed something: the fabric, a file system, the application);
    ``unexplained`` (it failed and no node showed anything). ``rules``: the nodes rules on the job
    fired on (:func:`job_detail` fills it in).
    """
    parts = job["nodes"]
    showed = [p["node"] for p in parts if p["findings"]]
    if job["phase"] in ("running", "ending"):
        kind, text = "running", "running" if job["phase"] == "running" else "ending (waiting for its nodes' ends)"
    elif not job["failed"]:
        kind, text = "ok", "did not fail"
    elif showed and (len(showed) < len(parts) or len(parts) == 1):
        only = "only " if len(parts) > 1 else ""
        kind, text = "nodes", f"failed; {only}{_names(showed)} showed something while it ran: " + "; ".join(
            f"{p['node']} {', '.join(p['codes'])}" for p in parts if p["findings"])
    elif showed:
        kind, text = "spread", f"failed; every node ({_names(showed)}) showed something: not one node's doing"
    else:
        kind, text = "unexplained", "failed; no node showed anything while it ran"
    return {"kind": kind, "nodes": showed if kind == "nodes" else [], "rules": [], "text": text}


def _names(nodes: list[str]) -> str:
    from ClusterShell.NodeSet import NodeSet

    return str(NodeSet.fromlist(nodes)) if nodes else "-"


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """A job as ``vetd jobs --json`` shows it."""
    ended = job["ended"]
    return {
        "cluster": job["cluster"],
        "job": job["id"],
        #: 0: the job id's latest run; 1, 2…: earlier ones (Slurm requeues a job under its id).
        "run": job["run"],
        "user": job["user"],
        "phase": job["phase"],
        "state": job["state"],
        "exit_code": job["exit_code"],
        "failed": job["failed"],
        "started": job["started"],
        "ended": ended,
        "runtime_s": None if ended is None else round(ended - job["started"], 3),
        "nodes": [p["node"] for p in job["nodes"]],
        "findings": sum(p["findings"] for p in job["nodes"]),
        "attribution": attribution(job),
    }


def job_summaries(store: Store, cluster: str | None, *, node: str | None = None, failed: bool = False,
                  since: float | None = None, limit: int = 200) -> list[dict[str, Any]]:
    return [job_summary(job) for job in store.jobs(cluster, node=node, failed=failed, since=since, limit=limit)]


def job_detail(store: Store, cluster: str | None, job_id: str, run: int = 0) -> dict[str, Any] | None:
    """A job's run as ``vetd job --json`` shows it (None: unknown): the summary, each node's part,
    the findings, what rules decided on it, and how many runs the job id had."""
    job = store.job(cluster, job_id, run)
    if job is None:
        return None
    names = [p["node"] for p in job["nodes"]]
    decisions = [{"ts": d["ts"], "node": d["node"], "rule": d["rule"]}
                 for d in store.job_decisions(job["cluster"], job_id, names, job["opened"], job["updated"])]
    summary = job_summary(job)
    if decisions:  # rules that weigh this job with the node's other jobs (job-failures-on-node)
        ruled = sorted({d["node"] for d in decisions})
        summary["attribution"]["rules"] = ruled
        summary["attribution"]["text"] += (f"; rules fired on {_names(ruled)} ("
                                           f"{', '.join(sorted({d['rule'] for d in decisions}))})")
    states = {n.name: n.state for n in store.node_rows() if n.cluster == job["cluster"] and n.name in names}
    parts = [{**part, "node_state": states.get(part["node"], "")} for part in job["nodes"]]  # vetd's view now
    return {**summary, "runs": job["runs"], "parts": parts, "found": job["findings"], "decisions": decisions}


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _outcome(job: dict[str, Any]) -> str:
    if job["phase"] in ("running", "ending", "lost"):
        return str(job["phase"])
    code = "" if job["exit_code"] is None else f" exit {job['exit_code']}"
    return f"{job['state'] or 'ended'}{code}"


def format_jobs(summaries: list[dict[str, Any]]) -> str:
    headers = ("JOB", "USER", "STARTED", "RUNTIME", "OUTCOME", "NODES", "POINTS AT")
    rows = [(s["job"] + (f" (run -{s['run']})" if s["run"] else ""), s["user"] or "-", _when(s["started"]),
             "-" if s["runtime_s"] is None else f"{s['runtime_s']:.0f}s", _outcome(s), _names(s["nodes"]),
             {"nodes": _names(s["attribution"]["nodes"]), "ok": "-"}.get(s["attribution"]["kind"],
                                                                         s["attribution"]["kind"]))
            for s in summaries]
    return table(headers, rows)


def format_job(detail: dict[str, Any]) -> str:
    run = "" if detail["runs"] < 2 else (
        f", run {detail['runs'] - detail['run']} of {detail['runs']} (requeued under its id; --run N shows run -N)")
    lines = [f"job {detail['job']} ({detail['cluster']}): {_outcome(detail)}"
             + (" (failed)" if detail["failed"] else "")
             + (f", user {detail['user']}" if detail["user"] else "") + run,
             f"  started {_when(detail['started'])}, ended {_when(detail['ended'])}"
             + ("" if detail["runtime_s"] is None else f", ran {detail['runtime_s']:.0f}s"),
             f"  points at: {detail['attribution']['text']}", "  nodes:"]
    lines += table(("    NODE", "NOW", "GPUS", "STARTED", "ENDED", "STATE", "FINDINGS", "SHOWED"), [
        (f"    {p['node']}", p["node_state"] or "-", p["gpus"] or "-", _when(p["started"]),
         _when(p["ended"]) if p["ended"] is not None else "never reported",
         p["state"] or ("-" if p["exit_code"] is None else f"exit {p['exit_code']}"),
         str(p["findings"]), ", ".join(p["codes"]) or "-") for p in detail["parts"]]).splitlines()
    if detail["found"]:
        lines.append("  findings:")
        lines += [f"    {_when(f['ts'])} {f['node']} {f['kind']} {f['name']}"
                  + ("" if f["entity"] == "node" else f"[{f['entity']}]") + f" {f['status']}"
                  + (f" {','.join(f['codes'])}" if f["codes"] else "") + (f": {f['message']}" if f["message"] else "")
                  for f in detail["found"]]
    if detail["decisions"]:
        lines.append("  rules:")
        lines += [f"    {_when(d['ts'])} {d['node']} {d['rule']}" for d in detail["decisions"]]
    return "\n".join(clean(line) for line in lines) + "\n"


# -- campaigns: `vetd vet NODES`, `vetd campaigns`, GET /api/v1/campaigns -----------------------

VERDICTS = ("good", "bad", "absent", "skipped")


def campaign_summary(row: dict[str, Any]) -> dict[str, Any]:
    """A stored campaign as ``vetd campaigns --json`` shows it: who asked, when, its nodes (and as a
    folded hostlist), its state, the nodes of each verdict, the links named and the figures of its run."""
    summary, running = row["summary"], row["state"] == "running"
    return {
        "campaign": row["id"],
        "cluster": row["cluster"],
        "state": row["state"],
        "error": row["error"],
        "trigger": row["trigger"],
        "test": summary.get("test") or row["test"],
        "started": row["started"],
        "ended": None if running else row["ended"],
        "took_s": None if running else round(row["ended"] - row["started"], 3),
        "nodes": row["nodes"],
        "hostlist": _names(row["nodes"]),
        **{verdict: summary.get(verdict, []) for verdict in VERDICTS},
        "links": summary.get("links", []),
        **{key: summary.get(key) for key in ("pairs_skipped", "rounds", "confirm_rounds", "rounds_s",
                                             "reference_gbps", "threshold_gbps")},
    }


def campaign_summaries(store: Store, cluster: str | None, *, since: float | None = None,
                       limit: int = 200) -> list[dict[str, Any]]:
    return [campaign_summary(row) for row in store.campaigns(cluster or None, since=since, limit=limit)]


def campaign_detail(store: Store, cluster: str | None, campaign_id: str) -> dict[str, Any] | None:
    """A campaign as ``vetd campaigns show ID --json`` shows it (None: unknown): the summary and, per
    node, its verdict, why, its pairs' median bandwidth (decimal GB/s; None: no pair measured), codes,
    metrics and slow links. A campaign stored before verdicts were (schema 6) has what its audit
    trail kept: verdict and reason."""
    row = store.campaign(cluster or None, campaign_id)
    if row is None:
        return None
    detail = campaign_summary(row)
    stored = {v["node"]: v for v in row["verdicts"]}
    of = {node: verdict for verdict in VERDICTS for node in detail[verdict]}
    verdicts = []
    for node in row["nodes"]:
        found = stored.get(node, {})
        metrics = found.get("metrics", {})
        verdicts.append({"node": node, "verdict": found.get("verdict") or of.get(node, "-"),
                         "reason": found.get("reason", ""), "median_gbps": metrics.get("pair_gbps_median"),
                         "codes": found.get("codes", []), "metrics": metrics,
                         "slow_links": found.get("slow_links", []),
                         **({"not_judged": found["not_judged"]} if found.get("not_judged") else {})})
    return {**detail, "verdicts": verdicts}


def _counts(c: dict[str, Any]) -> str:
    return ", ".join(f"{len(c[v])} {v}" for v in VERDICTS if c[v]) or "-"


def _found(c: dict[str, Any]) -> str:
    if c["state"] == "failed":
        return f"failed: {c['error']}"
    found = ([f"bad {_names(c['bad'])}"] if c["bad"] else []) + [f"link {k['a']}-{k['b']}" for k in c["links"]]
    return "; ".join(found) or "-"


def format_campaigns(summaries: list[dict[str, Any]]) -> str:
    headers = ("CAMPAIGN", "STARTED", "BY", "STATE", "TEST", "NODES", "VERDICTS", "FOUND")
    rows = [(c["campaign"], _when(c["started"]), c["trigger"], c["state"], c["test"], c["hostlist"],
             "-" if c["state"] == "running" else _counts(c), "-" if c["state"] == "running" else _found(c))
            for c in summaries]
    return table(headers, rows)


def format_report(report: Mapping[str, Any], *, median: bool = False, title: str | None = None) -> str:
    """A campaign's verdicts as ``vetd vet`` prints a job's: the run (after ``title``, by default
    ``campaign ID: ``), a table (node, verdict, why; with ``median``, each node's median bandwidth
    too), the bad links, how many are good."""
    nodes = report["nodes"]
    measured = [r for r in nodes if r["verdict"] != "skipped"]
    head = f"campaign {report['campaign']}: " if title is None else title
    if not measured:
        head += f"{len(nodes)} nodes, none idle to measure"
    elif report["pairs_skipped"]:
        head += f"{len(measured)} nodes; pairs not measured: {report['pairs_skipped']}"
    else:
        again = f" (+{report['confirm_rounds']} measuring slow links again)" if report["confirm_rounds"] else ""
        head += (f"{len(measured)} nodes, {report['test']}, {report['rounds']} round"
                 f"{'s' * (report['rounds'] != 1)}{again} in {report['rounds_s']:.1f}s; median "
                 f"{report['reference_gbps']:.3g} GB/s, slow below {report['threshold_gbps']:.3g} GB/s")
    head = clean(head) + "\n"  # a plugin's reason why pairs were skipped is the nodes' text

    def why(r: Mapping[str, Any]) -> str:
        return str(r["reason"]) + (f" ({r['not_judged']})" if r.get("not_judged") else "")

    if median:
        text = head + table(("NODE", "VERDICT", "MEDIAN GB/S", "WHY"), [
            (r["node"], r["verdict"].upper(), "-" if r.get("median_gbps") is None else f"{r['median_gbps']:.3g}",
             why(r)) for r in nodes])
    else:
        text = head + table(("NODE", "VERDICT", "WHY"), [(r["node"], r["verdict"].upper(), why(r)) for r in nodes])
    text += "".join(f"bad link {k['a']} <-> {k['b']}: {k['reason']}\n" for k in report["links"])
    counts = ", ".join(f"{len(report[v])} {v}" for v in ("bad", "absent", "skipped") if report[v])
    return text + f"{len(report['good'])} of {len(nodes)} nodes good{'; ' + counts if counts else ''}\n"


def format_campaign(detail: dict[str, Any]) -> str:
    """``vetd campaigns show ID``: who asked and when, then (once it ended) the report with medians."""
    line = (f"campaign {detail['campaign']} ({detail['cluster']}): {detail['state']}, asked by {detail['trigger']}, "
            f"started {_when(detail['started'])}")
    if detail["state"] == "running":
        return clean(f"{line}, running on {detail['hostlist']} ({detail['test']})") + "\n"
    line += f", took {detail['took_s']:.1f}s"
    if detail["state"] == "failed":
        return clean(f"{line}\n  failed: {detail['error']} ({detail['hostlist']})", keep_newlines=True) + "\n"
    return clean(line) + "\n" + format_report({**detail, "nodes": detail["verdicts"]}, median=True, title="  ")
