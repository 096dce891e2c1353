"""Job-to-node attribution on a replayed incident: what `vetd job` shows for each job, against what happened.

Replays ``tests/data/jobs/incident.jsonl`` (8 nodes, 11 jobs in 12 hours; its header says what
really happened: a node with a fault no check sees failing three jobs, an XID 79 during a job,
a user's bug on two nodes, a fabric incident every node of a job saw) through the controller
with the shipped rules into a database, then runs ``vetd job JOBID --config C --json`` for every
job, as an operator would, and counts:

* failed jobs a node caused, and how `vetd job` names that node: by the job's own findings
  (``points at``), by a rule that fired on the job, or by the node's state now (``NOW``);
* failed jobs no node caused, and nodes `vetd job` wrongly names for them (points at, a rule,
  or the node out of service or suspect now);
* how long after a silent node's first failed job a rule named it.

Checked before any figure: every job shown, decided, with its nodes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.record import verify, write_results
from tests.support.procs import run_vetd
from vetd.controller.config import ControllerConfig
from vetd.controller.replay import read_events, replay
from vetd.controller.store import Store
from vetd.core import logs

REPO = Path(__file__).resolve().parents[1]
INCIDENT = REPO / "tests" / "data" / "jobs" / "incident.jsonl"
RULES = REPO / "packaging" / "rules" / "default.yaml"
#: What really happened (the incident file's header): the node at fault for each failed job; None: none is.
TRUTH: dict[str, str | None] = {"1002": "nid006", "1005": "nid006", "1008": "nid006", "1007": "nid003",
                                "1004": None, "1006": None, "1009": None}
JOBS = ("1001", "1002", "1003", "1004", "1005", "1006", "1007", "1008", "1009", "1010", "1011")
OUT_OF_LINE = ("suspect", "excluded", "failed", "healing", "probation")


def named(job: dict[str, Any]) -> dict[str, set[str]]:
    """The nodes `vetd job` names for a job, by how."""
    return {"points_at": set(job["attribution"]["nodes"]), "rules": {d["node"] for d in job["decisions"]},
            "now": {p["node"] for p in job["parts"] if p["node_state"] in OUT_OF_LINE}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.parse_args()
    logs.setup("warning")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "c.db")
        started = time.perf_counter()
        decisions = replay([str(RULES)], read_events(INCIDENT), ControllerConfig(cluster="replay"), keep=store)
        replay_s = time.perf_counter() - started
        store.close()
        config = Path(tmp) / "controller.toml"
        config.write_text('cluster = "replay"\n[store]\npath = "c.db"\n')
        shown: dict[str, dict[str, Any]] = {}
        for job in JOBS:
            done = run_vetd("job", job, "--config", str(config), "--json")
            verify(done.returncode == 0, f"vetd job {job}: exit {done.returncode}: {done.stderr.strip()}")
            shown[job] = json.loads(done.stdout)
    verify(all(j["phase"] == "done" and j["parts"] for j in shown.values()), "every job decided, with its nodes")
    verify({j for j, d in shown.items() if d["failed"]} == set(TRUTH), "the failed jobs are the incident's")

    caused = {job: node for job, node in TRUTH.items() if node}
    by: dict[str, list[str]] = {"points_at": [], "rules": [], "now": []}
    for job, node in caused.items():
        for how, nodes in named(shown[job]).items():
            if node in nodes:
                by[how].append(job)
    named_at_all = sorted(job for job, node in caused.items() if any(node in n for n in named(shown[job]).values()))
    wrong = {job: sorted(set().union(*named(shown[job]).values())) for job, node in TRUTH.items() if node is None}
    wrongly = {job: nodes for job, nodes in wrong.items() if nodes}
    also_wrong = {job: sorted(set().union(*named(shown[job]).values()) - {node})
                  for job, node in caused.items()}
    suspect = [d for d in decisions if d.action == "suspect"]
    first_fail = min(shown[job]["ended"] for job, node in caused.items() if node == "nid006")
    figures = {
        "jobs": len(shown),
        "failed_jobs": len(TRUTH),
        "node_caused": len(caused),
        "named_by_the_jobs_findings": sorted(by["points_at"]),
        "named_by_a_rule_on_the_job": sorted(by["rules"]),
        "named_by_the_nodes_state_now": sorted(by["now"]),
        "node_caused_named": f"{len(named_at_all)}/{len(caused)}",
        "not_node_caused": len(TRUTH) - len(caused),
        "not_node_caused_wrongly_named": wrongly,
        "other_nodes_named_for_node_caused_jobs": {job: nodes for job, nodes in also_wrong.items() if nodes},
        "suspects": sorted({d.node for d in suspect}),
        "silent_node_named_after_s": round(suspect[0].ts - first_fail, 1) if suspect else None,
        "replay_s": round(replay_s, 3),
        "attribution": {job: shown[job]["attribution"]["kind"] for job in JOBS},
    }
    for key, value in figures.items():
        print(f"{key}: {value}")
    path = write_results("jobs", figures, incident=str(INCIDENT.relative_to(REPO)), rules=str(RULES.relative_to(REPO)))
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
