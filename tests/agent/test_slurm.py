"""`vetd slurm prolog` / `epilog` against a real agent (simulated NVML scenarios), without slurmd.

What slurmd gives them is their environment; these tests set it as slurmd does
(``tests/test_slurm_jobs.py`` runs them under a real Slurm).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.procs import VetdProcess, Watcher, publish_raw, run_vetd, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.agent.slurm import Job, JobError
from vetd.core import protocol
from vetd.core.protocol import Event, ServiceNotice

FAULTY = "gpus: 2\nbase: {temp_c: 31, utilization_pct: 0}\ntimeline:\n" \
         "  - {at: 0s, gpu: 1, set: {ecc_volatile_dram_uncorrectable: 2}}\n"


def test_the_job_is_read_from_slurms_environment() -> None:
    job = Job.from_environ({"SLURM_JOB_ID": "42", "SLURMD_NODENAME": "nid001", "SLURM_JOB_USER": "alice",
                            "CUDA_VISIBLE_DEVICES": "1", "SLURM_JOB_GPUS": "0,1"})
    assert (job.id, job.node, job.user, job.gpus, job.state) == ("42", "nid001", "alice", "0,1", "")
    assert Job.from_environ({"SLURM_JOB_ID": "1", "CUDA_VISIBLE_DEVICES": "GPU-5ce0"}).gpus == "GPU-5ce0"
    # the epilog: SLURM_JOB_EXIT_CODE2 (exit:signal) first, else SLURM_JOB_EXIT_CODE (a wait status)
    ended = Job.from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE2": "3:0", "SLURM_JOB_EXIT_CODE": "768",
                              "SLURM_JOB_DERIVED_EC": str(7 << 8)})
    assert (ended.exit_code, ended.signal, ended.derived_exit_code, ended.state) == (3, 0, 7, "failed")
    assert Job.from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE": "768"}).exit_code == 3
    killed = Job.from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE": "15"})
    assert (killed.exit_code, killed.signal, killed.state) == (0, 15, "signaled")
    assert Job.from_environ({"SLURM_JOB_ID": "1", "SLURM_JOB_EXIT_CODE2": "0:0"}).state == "completed"
    with pytest.raises(JobError, match="SLURM_JOB_ID is not set"):
        Job.from_environ({"SLURMD_NODENAME": "nid001"})


def test_run_by_hand_it_says_what_is_missing() -> None:
    done = run_vetd("slurm", "prolog", env={k: v for k, v in vetd_env().items() if not k.startswith("SLURM_")})
    assert done.returncode == 2
    assert done.stderr.strip() == ("vetd slurm prolog: SLURM_JOB_ID is not set: this runs as slurm.conf's "
                                   "Prolog= or Epilog=, not by hand")


def slurm_env(config: Path, job: str = "42", **extra: str) -> dict[str, str]:
    """The environment slurmd gives a prolog: no PATH, the job's variables."""
    base = {k: v for k, v in vetd_env().items() if not k.startswith(("SLURM", "CUDA", "VETD_CONTROL"))}
    return {**base, "VETD_CONFIG": str(config), "SLURM_JOB_ID": job, "SLURMD_NODENAME": "nid001",
            "SLURM_JOB_USER": "alice", **extra}


class Node:
    def __init__(self, root: Path, broker: Mosquitto, cluster: str, extra: str, scenario: str = FAULTY) -> None:
        self.root, self.cluster, self.broker = root, cluster, broker
        self.sock = str(root / "agent.sock")
        (root / "faulty.yaml").write_text(scenario)
        self.config = root / "agent.toml"
        self.config.write_text(f"""\
[agent]
cluster = "{cluster}"
node = "nid001"
broker = "{broker.url}"
control_socket = "{self.sock}"
interval = "1h"
load_plugins = ["vetd_testplugin"]
disable_plugins = ["host"]
[commands]
allow_unsigned = true
[plugins.gpu_health]
source = "scenario"
scenario = "{root}/faulty.yaml"
through_nvml = true
{extra}""")
        self.agent = VetdProcess(["agent", "--config", str(self.config)], root / "agent.log",
                                 vetd_env(VETD_CONTROL_SOCKET=self.sock)).start()
        wait_for(lambda: '"event": "broker_connected"' in self.agent.output, 20, "the agent connected")

    def vetd(self, stage: str, **env: str) -> tuple[int, str, float]:
        started = time.monotonic()
        done = run_vetd("slurm", stage, env=slurm_env(self.config, **env))
        return done.returncode, done.stderr, time.monotonic() - started

    def notice(self, service: str, **fields: object) -> None:
        message = ServiceNotice(cluster=self.cluster, node="nid001", session="ctl", seq=0, ts=time.time(),
                                service=service, **fields)  # type: ignore[arg-type]
        publish_raw(self.broker.port, protocol.service_topic(self.cluster, "nid001"), protocol.encode(message),
                    retain=True)
        wait_for(lambda: (ask(self.sock, {"op": "status"}, 5)["service"].get("controller") or {}).get("service")
                 == service, 10, "the notice at the agent")


@pytest.fixture
def node(tmp_path: Path, mosquitto: Mosquitto, cluster_name: str, request: pytest.FixtureRequest) -> Iterator[Node]:
    param = getattr(request, "param", "")
    extra, scenario = param if isinstance(param, tuple) else (param, FAULTY)
    started = Node(tmp_path, mosquitto, cluster_name, extra, scenario)
    yield started
    assert started.agent.stop() == 0


def test_a_failed_check_on_the_jobs_gpus_is_a_node_fault_another_gpu_is_not(node: Node) -> None:
    # gpu1 has double-bit errors: a job given gpu0 only is not held up by it
    code, err, _ = node.vetd("prolog", SLURM_JOB_GPUS="0")
    assert code == 0, err
    assert "prolog job 42 on nid001: " in err and "passed" in err
    code, err, _ = node.vetd("prolog", job="43", SLURM_JOB_GPUS="0,1")
    assert code == 1
    assert "vetd: node fault on nid001: vetd: prolog nid001: gpu_health[gpu1] ecc_dbe: 2 volatile" in err
    # no Slurm here: scontrol cannot set the reason, which is said, and the fault stands
    assert "scontrol could not set the drain reason" in err


@pytest.mark.parametrize("node", ['[slurm]\nset_reason = false\n'], indirect=True)
def test_the_controllers_exclusion_fails_the_prolog_and_its_breaker_holds_back_a_drain(node: Node) -> None:
    node.notice("excluded", state="excluded", reason="vetd: operator bob: fan")
    code, err, _ = node.vetd("prolog", SLURM_JOB_GPUS="0")
    assert code == 1 and "vetd: node fault on nid001: vetd: operator bob: fan" in err
    # the partition's breaker is open: vetd drains nothing there, prolog included
    node.notice("in_service", state="suspect", breaker_open=True)
    code, err, _ = node.vetd("prolog", job="44")
    assert code == 0, err
    assert "circuit breaker of this node's partition is open" in err and "the job runs" in err


@pytest.mark.xdist_group("timing")  # bounds a duration: beside no other such test (tests/conftest.py)
@pytest.mark.parametrize("node", ['[slurm]\nprolog_deadline = "2s"\n[profiles]\nprolog = ["hangs", "raises"]\n'
                                  '[plugins.testplugin]\nonly = ["hangs", "raises"]\nhang_timeout = "60s"\n'],
                         indirect=True)
def test_vetds_own_failure_lets_the_job_run_within_the_deadline(node: Node) -> None:
    code, err, took = node.vetd("prolog", SLURM_JOB_GPUS="0")
    assert code == 0, err
    assert took < 2.0 + 1.0, took  # its deadline, and the interpreter's exit
    assert "timed out (vetd's failure) (hangs[node])" in err and "errored (vetd's failure) (raises[node])" in err
    assert err.rstrip().endswith("the job runs")
    node.agent.stop()
    code, err, _ = node.vetd("prolog", job="45")
    assert code == 0 and "cannot ask vetd (no control socket at" in err


XID_LATER = FAULTY + "  - {at: 12s, gpu: 0, xid: 79, message: GPU has fallen off the bus.}\n"


@pytest.mark.parametrize("node", [("", XID_LATER)], indirect=True)
def test_a_critical_xid_on_the_jobs_gpu_fails_the_epilog(node: Node, mosquitto: Mosquitto) -> None:
    assert ask(node.sock, {"op": "job_start", "job_id": "46", "user": "alice", "gpus": "0"}, 5)["ok"]
    watcher = Watcher(mosquitto.port, f"vetd/v1/{node.cluster}/node/nid001/event")
    try:
        # the XID watch (NVML's event set) reports it during the job, with the job's id
        xid = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Event) and m.name == "xid")], 30,
                       "the XID during the job")
        assert xid[0].job_id == "46" and xid[0].severity == "critical" and xid[0].entity == "gpu0"
        code, err, _ = node.vetd("epilog", job="46", SLURM_JOB_GPUS="0", SLURM_JOB_EXIT_CODE2="0:0")
        assert code == 1, err
        assert "vetd: node fault on nid001: vetd: epilog nid001: critical during the job: xid xid_79 on gpu0" in err
        ended = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Event) and m.name == "job_end")],
                         10, "the job's end")
        assert ended[0].job_id == "46" and ended[0].codes == ["completed"]
        assert ended[0].metrics["critical_events"] >= 1.0 and ended[0].metrics["exit_code"] == 0.0
    finally:
        watcher.close()


def test_a_bad_slurm_config_is_one_line_and_never_drains(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\nnode = "nid001"\n[slurm]\nprolog_deadline = "100ms"\n')
    done = run_vetd("slurm", "prolog", env=slurm_env(config))
    assert done.returncode == 0  # vetd's own failure: the job runs
    assert (f"prolog job 42 on nid001: config error: {config}:4: slurm.prolog_deadline: must be between 500ms "
            "and 1h; the job runs") in done.stderr
    checked = run_vetd("check", "--list", "--config", str(config))
    assert checked.returncode == 2
    assert checked.stderr.strip() == (f"vetd: config error: {config}:4: slurm.prolog_deadline: must be between "
                                      "500ms and 1h")
    config.write_text('[slurm]\nprolog_deadlin = "10s"\n')
    done = run_vetd("slurm", "epilog", env=slurm_env(config))
    assert done.returncode == 0 and "slurm.prolog_deadlin" in done.stderr and "the node stays in service" in done.stderr
