"""`vetd slurm prolog` / `epilog` as a real Slurm's Prolog= and Epilog= (two slurmds, nid001 and nid002).

Each node has its agent (real Mosquitto, a real controller with backend slurm)
whose GPUs are a simulated NVML scenario: nid001's two GPUs are healthy,
nid002's gpu1 has double-bit ECC errors. slurmd runs the shipped wrappers in
``packaging/slurm/`` (through a wrapper that only points them at the node's
agent config, as /etc/vetd/agent.toml would). nid002 has the lower weight, so
Slurm tries it first. The controller's rules only alert here: the drain under
test is the prolog's, not the controller's.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.procs import REPO, VetdProcess, Watcher, run_vetd, vetd_env
from tests.support.services import Mosquitto, Slurm, missing
from tests.support.wait import wait_for
from vetd.core.protocol import Event, Result

VETD = str(Path(sys.executable).with_name("vetd"))
NODES = ("nid001", "nid002")
HEALTHY = "gpus: 2\nbase: {temp_c: 31, utilization_pct: 0}\n"
FAULTY = HEALTHY + "timeline:\n  - {at: 0s, gpu: 1, set: {ecc_volatile_dram_uncorrectable: 2}}\n"
RULES = """\
rules:
  - name: check-failed
    when: result.status == "fail"
    severity: critical
    actions: [alert]
"""


@dataclass
class Site:
    root: Path
    cluster: str
    slurm: Slurm
    broker: Mosquitto
    controller_config: Path
    controller: VetdProcess | None = None
    agents: dict[str, VetdProcess] = field(default_factory=dict)
    watcher: Watcher | None = None

    def agent_config(self, node: str) -> Path:
        return self.root / f"agent-{node}.toml"

    def start_agent(self, node: str) -> None:
        proc = VetdProcess(["agent", "--config", str(self.agent_config(node))], self.root / f"agent-{node}.log",
                           vetd_env(VETD_CONTROL_SOCKET=str(self.root / f"{node}.sock"))).start()
        self.agents[node] = proc
        wait_for(lambda: '"event": "broker_connected"' in proc.output, 30, f"{node}'s agent connected")

    def sbatch(self, *args: str) -> str:
        return self.slurm.run("sbatch", "--parsable", "-o", f"{self.root}/job-%j.out", *args).strip()

    def job(self, job_id: str) -> dict[str, str]:
        text = self.slurm.run("scontrol", "show", "job", "-o", job_id).strip()
        return dict(part.split("=", 1) for part in text.split() if "=" in part)

    def finished(self, job_id: str, timeout: float) -> dict[str, str]:
        return wait_for(lambda: (job := self.job(job_id))["JobState"] in ("COMPLETED", "FAILED") and job, timeout,
                        f"job {job_id} to finish")

    def history(self, node: str) -> list[dict[str, Any]]:
        done = run_vetd("export", "--node", node, "--config", str(self.controller_config))
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def results(self, job_id: str, **match: str) -> list[Result]:
        """Results on the wire for this job, with these field values (``profile="prolog"``)."""
        assert self.watcher is not None
        return [m for m in self.watcher.select(lambda m: isinstance(m, Result)) if isinstance(m, Result)
                and m.job_id == job_id and all(getattr(m, key) == value for key, value in match.items())]

    def wire_events(self, name: str, job_id: str) -> list[Event]:
        assert self.watcher is not None
        return [m for m in self.watcher.select(lambda m: isinstance(m, Event) and m.name == name)
                if isinstance(m, Event) and m.job_id == job_id]

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mosquitto: Mosquitto) -> Iterator[Site]:
    if absent := missing("munged", "slurmctld", "slurmd", "scontrol", "sinfo", "sbatch"):
        pytest.skip(f"not installed: {', '.join(absent)} (scripts/test installs them as root)")
    root = tmp_path_factory.mktemp("jobs")
    cluster = f"t{uuid.uuid4().hex[:10]}"
    for stage in ("prolog", "epilog"):  # what /etc/vetd/agent.toml is on a node: here one per node
        wrapper = root / f"{stage}.sh"
        wrapper.write_text(f"#!/bin/sh\nexport VETD_BIN={VETD} VETD_CONFIG={root}/agent-$SLURMD_NODENAME.toml\n"
                           f"exec {REPO}/packaging/slurm/{stage}.sh 2>>{root}/{stage}-$SLURMD_NODENAME.log\n")
        wrapper.chmod(0o755)
    slurm = Slurm(root / "slurm", daemons=NODES, weights={"nid001": 10, "nid002": 1}, cred_expire=5,
                  extra=f"Prolog={root}/prolog.sh\nEpilog={root}/epilog.sh\nPrologEpilogTimeout=60\n"
                        "SchedulerParameters=nohold_on_prolog_fail\n").start()
    (root / "rules.yaml").write_text(RULES)
    config = root / "controller.toml"
    config.write_text(f'cluster = "{cluster}"\nclient_id = "vetd-controller-{cluster}"\nrules = ["rules.yaml"]\n'
                      f'[store]\npath = "controller.db"\n[scheduler]\nbackend = "slurm"\n')
    site = Site(root, cluster, slurm, mosquitto, config)
    try:
        site.watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster}/#")
        site.controller = VetdProcess(["controller", "--config", str(config)], root / "controller.log",
                                      vetd_env(VETD_BROKER=mosquitto.url, SLURM_CONF=str(slurm.conf))).start()
        wait_for(lambda: "broker_connected" in site.controller.output, 20, "the controller connected")
        for node, scenario in zip(NODES, (HEALTHY, FAULTY), strict=True):
            (root / f"{node}.yaml").write_text(scenario)
            site.agent_config(node).write_text(f"""\
[agent]
cluster = "{cluster}"
node = "{node}"
broker = "{mosquitto.url}"
control_socket = "{root}/{node}.sock"
state_dir = "{root}/state"
interval = "1h"
[commands]
allow_unsigned = true
[plugins.gpu_health]
source = "scenario"
scenario = "{root}/{node}.yaml"
through_nvml = true
""")
            site.start_agent(node)
        yield site
    finally:
        for agent in site.agents.values():
            agent.stop()
        if site.controller is not None:
            site.controller.stop()
        if site.watcher is not None:
            site.watcher.close()
        slurm.stop()


def test_a_job_on_a_healthy_node_runs_and_the_epilog_records_its_end(site: Site) -> None:
    job_id = site.sbatch("-w", "nid001", "--wrap", "echo ran on $SLURMD_NODENAME; exit 3")
    job = site.finished(job_id, 60)
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "3:0" and job["NodeList"] == "nid001"
    assert "ran on nid001" in (site.root / f"job-{job_id}.out").read_text()
    wait_for(lambda: site.slurm.states()["nid001"] == "idle", 15, "nid001 idle again, not drained")
    # the prolog's checks ran in the agent, for this job: results carry its id and profile
    prolog = site.results(job_id, profile="prolog")
    assert {r.check for r in prolog} >= {"gpu_health", "gpu_idle", "host_memory"}
    assert all(r.status in ("pass", "warn", "skip") for r in prolog), [(r.check, r.entity, r.status) for r in prolog]
    # the epilog's too, and the end with its exit state, on the wire and in the controller's history
    assert {r.check for r in site.results(job_id, profile="epilog")} == {"gpu_health", "gpu_idle"}
    ended = wait_for(lambda: site.wire_events("job_end", job_id), 15, "the job_end event")
    assert ended[0].node == "nid001" and ended[0].metrics["exit_code"] == 3.0 and ended[0].codes == ["failed"]
    assert site.wire_events("job_start", job_id)[0].message == f"job {job_id} started for root"
    # the controller keeps the job: its user, node, state and exit code (vetd job)
    def decided() -> dict[str, Any] | None:
        shown = run_vetd("job", job_id, "--config", str(site.controller_config), "--json")
        return json.loads(shown.stdout) if shown.returncode == 0 and '"phase": "done"' in shown.stdout else None

    stored = wait_for(decided, 15, "the job decided at the controller")
    assert (stored["user"], stored["state"], stored["exit_code"], stored["failed"]) == ("root", "FAILED", 3, True)
    assert [part["node"] for part in stored["parts"]] == ["nid001"]
    assert "vetd-slurm: prolog job" in site.log("prolog-nid001.log")


def test_a_node_whose_prolog_check_fails_is_drained_and_the_job_runs_on_another(site: Site) -> None:
    job_id = site.sbatch("--wrap", "echo ran on $SLURMD_NODENAME")  # nid002 first: its weight is lower
    try:
        wait_for(lambda: "drain" in site.slurm.states().get("nid002", ""), 60, "nid002 drained by its prolog")
        reason = site.slurm.show("nid002")["Reason"]
        assert reason.startswith("vetd: prolog nid002: gpu_health[gpu1] ecc_dbe: 2 volatile uncorrectable ECC"), reason
        job = site.finished(job_id, 90)  # requeued (cred_expire: 5 s) and run on nid001
        assert job["JobState"] == "COMPLETED" and job["NodeList"] == "nid001" and job["Restarts"] == "1", job
        assert "ran on nid001" in (site.root / f"job-{job_id}.out").read_text()
        wait_for(lambda: site.slurm.states()["nid001"] == "idle", 15, "nid001 idle, not drained")
        # the failed verdict went to the controller through the agent, with the job's id
        failed = site.results(job_id, node="nid002", status="fail")
        assert [(r.check, r.entity, r.codes) for r in failed] == [("gpu_health", "gpu1", ["ecc_dbe"])]
        # nid002 ended the job it would not run; nid001 ran it and ended it
        assert [e.codes for e in site.wire_events("job_end", job_id) if e.node == "nid002"] == [["prolog_failed"]]
        wait_for(lambda: [e for e in site.wire_events("job_end", job_id) if e.node == "nid001"], 15,
                 "the end on nid001")
        # the controller kept nid002's end: an export writes it as a job line
        wait_for(lambda: [line for line in site.history("nid002") if line["kind"] == "job" and line["phase"] == "end"
                          and line["job_id"] == job_id and line["state"].lower() == "prolog_failed"], 15,
                 "nid002's prolog_failed end at the controller")
        assert "vetd: node fault on nid002" in site.log("prolog-nid002.log")
    finally:
        site.slurm.resume("nid002")


def test_vetd_down_never_drains(site: Site) -> None:
    agent = site.agents.pop("nid001")
    assert agent.stop() == 0
    try:
        job_id = site.sbatch("-w", "nid001", "--wrap", "true")
        job = site.finished(job_id, 60)
        assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0"
        wait_for(lambda: site.slurm.states()["nid001"] == "idle", 15, "nid001 idle, not drained")
        log = site.log("prolog-nid001.log")
        assert f"prolog job {job_id} on nid001: cannot ask vetd (no control socket at" in log
        assert "the job runs" in log
    finally:
        site.start_agent("nid001")


def test_a_job_killed_by_a_signal_ends_signaled(site: Site) -> None:
    """The exit state the epilog reads from Slurm (SLURM_JOB_EXIT_CODE2) for a script a signal ended."""
    job_id = site.sbatch("-w", "nid001", "--wrap", "kill -TERM $$")
    job = site.finished(job_id, 60)
    ended = wait_for(lambda: site.wire_events("job_end", job_id), 15, "the job_end event")
    assert job["ExitCode"] == "0:15"
    assert ended[0].codes == ["signaled"] and ended[0].metrics["signal"] == 15.0, (job, ended[0])
    assert ended[0].metrics["exit_code"] == 0.0
