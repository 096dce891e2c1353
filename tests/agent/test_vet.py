"""``vetd vet`` across nodes with real networks: a network namespace per node, ``tc`` to break one.

Each task runs in its node's namespace with the environment Slurm sets (see
:class:`tests.support.netns.VetJob`); ``test_srun_across_namespaced_slurmds``
runs them with ``srun`` through a real slurmd in each namespace. Probes are short (0.5 s, two
streams) to keep the CPU modest; the throttles are 100× below what the veth
pairs carry here, so the verdicts do not depend on the machine's load.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import netns
from tests.support.netns import NetNodes, SlurmOnNodes, VetJob
from tests.support.procs import VetdProcess, Watcher, run_vetd, vetd_argv, vetd_env
from tests.support.services import Mosquitto, missing
from tests.support.wait import wait_for
from vetd.agent.controlclient import ask
from vetd.core.protocol import Result

pytestmark = [pytest.mark.skipif(bool(netns.unavailable()), reason=netns.unavailable() or "-"),
              pytest.mark.xdist_group("netns")]  # tests/conftest.py: one netns test at a time

PROTOCOL = "name: host memory only\nchecks:\n  - host_memory\n"
CONFIG = '[plugins.tcp_pairs]\nseconds = "{seconds}"\nstreams = 2\n'


@pytest.fixture(scope="module")
def six() -> Iterator[NetNodes]:
    nodes = NetNodes(6).start()
    yield nodes
    nodes.stop()


@pytest.fixture
def net(six: NetNodes) -> Iterator[NetNodes]:
    yield six
    for node in six.names:
        six.unthrottle(node)


def _job(net: NetNodes, tmp_path: Path, *args: str, seconds: str = "0.5s", **kw: object) -> VetJob:
    (tmp_path / "agent.toml").write_text(CONFIG.format(seconds=seconds))
    (tmp_path / "protocol.yaml").write_text(PROTOCOL)
    argv = ["--config", str(tmp_path / "agent.toml"), "--protocol", str(tmp_path / "protocol.yaml"),
            "--json", "--good-file", "good", "--bad-file", "bad", "--port", "18555", *args]
    return VetJob(net, argv, tmp_path / "job", vetd_env(VETD_LOG_LEVEL="debug"), **kw)  # type: ignore[arg-type]


def _verdicts(out: str) -> dict[str, dict[str, object]]:
    return {row["node"]: row for row in map(json.loads, out.splitlines())}


def test_every_node_good_on_a_healthy_network(net: NetNodes, tmp_path: Path) -> None:
    job = _job(net, tmp_path).start()
    done = job.wait()
    assert {node: d.returncode for node, d in done.items()} == dict.fromkeys(net.names, 0), done["nid001"].stderr
    verdicts = _verdicts(done["nid001"].stdout)
    assert list(verdicts) == net.names
    for row in verdicts.values():
        assert row["verdict"] == "good" and set(row) >= {"node", "verdict", "reason", "metrics"}
        metrics = row["metrics"]
        assert isinstance(metrics, dict) and metrics["pairs"] == 3 and metrics["pair_gbps_median"] > 0.05
    assert all(d.stdout == "" for node, d in done.items() if node != "nid001")  # rank 0 reports
    assert (job.workdir / "good").read_text() == "nid[001-006]\n"
    assert (job.workdir / "bad").read_text() == ""


def test_a_throttled_node_is_named_bad(net: NetNodes, tmp_path: Path) -> None:
    net.throttle("nid004", "16mbit")
    done = _job(net, tmp_path, "--need", "5").start().wait()
    verdicts = _verdicts(done["nid001"].stdout)
    assert {n for n, v in verdicts.items() if v["verdict"] != "good"} == {"nid004"}, done["nid001"].stdout
    assert verdicts["nid004"]["verdict"] == "bad" and "slow with every partner" in str(verdicts["nid004"]["reason"])
    assert all(not v["slow_links"] for v in verdicts.values())
    assert {d.returncode for d in done.values()} == {0}  # 5 good, 5 needed
    assert (tmp_path / "job" / "good").read_text() == "nid[001-003,005-006]\n"
    assert (tmp_path / "job" / "bad").read_text() == "nid004\n"


def test_a_throttled_link_is_named_and_its_nodes_stay_good(net: NetNodes, tmp_path: Path) -> None:
    net.throttle_link("nid002", "nid003", "16mbit")  # nid002 → nid003 only; ring neighbours, so measured
    done = _job(net, tmp_path).start().wait()
    verdicts = _verdicts(done["nid001"].stdout)
    assert all(v["verdict"] == "good" for v in verdicts.values()), done["nid001"].stdout
    assert verdicts["nid002"]["slow_links"] == ["nid003"] and verdicts["nid003"]["slow_links"] == ["nid002"]
    assert all(not v["slow_links"] for n, v in verdicts.items() if n not in ("nid002", "nid003"))
    assert {d.returncode for d in done.values()} == {0}


def test_the_table_names_the_link(net: NetNodes, tmp_path: Path) -> None:
    net.throttle_link("nid005", "nid006", "16mbit")
    job = _job(net, tmp_path)
    job.args.remove("--json")
    done = job.start().wait()
    out = done["nid001"].stdout
    assert "6 nodes, tcp_pairs, 3 rounds (+1 measuring slow links again)" in out, out
    assert "bad link nid005 <-> nid006:" in out and "6 of 6 nodes good, 6 needed" in out
    assert [line.split()[:2] for line in out.splitlines()[2:8]] == [[n, "GOOD"] for n in net.names]


def test_a_task_killed_mid_run_is_absent_and_blames_no_one(net: NetNodes, tmp_path: Path) -> None:
    job = _job(net, tmp_path, seconds="1s").start()
    try:
        wait_for(lambda: '"vet_round"' in job.stderr("nid003") and '"round": 1' in job.stderr("nid003"), 60,
                 "nid003 to start its second round")
        job.kill("nid003")
        done = job.wait()
    finally:
        job.stop()
    assert done["nid003"].returncode == -signal.SIGKILL
    verdicts = _verdicts(done["nid001"].stdout)
    assert verdicts["nid003"]["verdict"] == "absent" and "left during round 2" in str(verdicts["nid003"]["reason"])
    assert all(v["verdict"] == "good" and not v["slow_links"] for n, v in verdicts.items() if n != "nid003"), \
        done["nid001"].stdout
    # 5 good of 6 needed: every remaining task exits 1
    assert {n: d.returncode for n, d in done.items() if n != "nid003"} == dict.fromkeys(
        [n for n in net.names if n != "nid003"], 1)
    assert (tmp_path / "job" / "good").read_text() == "nid[001-002,004-006]\n"
    assert (tmp_path / "job" / "bad").read_text() == ""  # absent is not bad


def test_a_task_that_never_arrives_is_absent_and_one_too_late_is_told(net: NetNodes, tmp_path: Path) -> None:
    # 3 s probes: rank 0 still serves (3 rounds, 9 s) when the late task, started once they begin, knocks
    job = _job(net, tmp_path, "--deadline", "3s", "--need", "4", skip=("nid005", "nid006"), seconds="3s").start()
    try:
        wait_for(lambda: '"vet_round"' in job.stderr("nid001"), 60, "the rounds to start without nid005, nid006")
        job.start_one("nid005")  # after the deadline, while the others measure
        done = job.wait()
    finally:
        job.stop()
    verdicts = _verdicts(done["nid001"].stdout)
    assert verdicts["nid006"]["verdict"] == "absent" == verdicts["nid005"]["verdict"]
    assert "never arrived within the 3s deadline" in str(verdicts["nid006"]["reason"])
    assert all(v["verdict"] == "good" for n, v in verdicts.items() if n not in ("nid005", "nid006"))
    assert {n: d.returncode for n, d in done.items()} == {"nid001": 0, "nid002": 0, "nid003": 0, "nid004": 0,
                                                          "nid005": 1}
    assert "arrived after the 3s deadline: reported absent" in done["nid005"].stderr


def test_a_node_failing_its_local_checks_is_bad_and_left_out_of_the_pairs(net: NetNodes, tmp_path: Path) -> None:
    (tmp_path / "env.yaml").write_text("checks:\n  - host_env:\n      required_env: {VETD_VET_TEST: \"yes\"}\n")
    job = _job(net, tmp_path, node_env={n: {"VETD_VET_TEST": "yes"} for n in net.names if n != "nid002"})
    job.args[job.args.index("--protocol") + 1] = str(tmp_path / "env.yaml")
    done = job.start().wait()
    verdicts = _verdicts(done["nid001"].stdout)
    assert verdicts["nid002"]["verdict"] == "bad" and verdicts["nid002"]["codes"] == ["local_checks"]
    assert "host_env" in str(verdicts["nid002"]["reason"])
    good = [v for n, v in verdicts.items() if n != "nid002"]
    assert all(v["verdict"] == "good" and "nid002" not in str(v["reason"]) for v in good)
    assert {d.returncode for d in done.values()} == {1}


def test_nccl_pairs_without_gpus_skip_with_a_reason(net: NetNodes, tmp_path: Path) -> None:
    """NCCL is selectable and shares the orchestration; without GPUs the pairs are skipped, saying why."""
    done = _job(net, tmp_path, "--test", "nccl_pairs").start().wait()
    verdicts = _verdicts(done["nid001"].stdout)
    for row in verdicts.values():
        assert row["verdict"] == "good" and row["codes"] == ["pairs_skipped"]
        assert "nccl_pairs cannot run here" in str(row["reason"])
    assert {d.returncode for d in done.values()} == {0}


def test_outside_a_job_and_bad_options_are_one_line_exit_2() -> None:
    done = run_vetd("vet")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "SLURM_PROCID" in done.stderr and "Traceback" not in done.stderr
    job = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "nid[001-002]", "SLURMD_NODENAME": "nid001"}
    for args, expected in ((["--need", "3"], "--need 3: the step has 2 nodes"),
                           (["--test", "infiniband"], "--test infiniband: no such pair test"),
                           (["--rounds", "0"], "at least 1 round"),
                           (["--slow-fraction", "2"], "a fraction in (0, 1]")):
        done = run_vetd("vet", *args, env=vetd_env(**job))
        assert done.returncode == 2 and expected in done.stderr and done.stderr.count("\n") == 1, done.stderr
    done = run_vetd("vet", env=vetd_env(**{**job, "SLURM_NTASKS": "4"}))
    assert done.returncode == 2 and "vet needs one task per node" in done.stderr


@pytest.mark.slurm
def test_srun_across_namespaced_slurmds(tmp_path: Path) -> None:
    """The real thing: ``srun -N 4 --ntasks-per-node=1 vetd vet``, a slurmd in each node's namespace."""
    if absent := missing("munged", "slurmctld", "slurmd", "srun", "nsenter", "unshare"):
        pytest.skip(f"{', '.join(absent)} not installed (scripts/test installs them as root)")
    nodes = NetNodes(4).start()
    slurm = None
    try:
        slurm = SlurmOnNodes(nodes, tmp_path / "slurm").start()
        nodes.throttle("nid003", "16mbit")
        (tmp_path / "agent.toml").write_text(CONFIG.format(seconds="0.5s"))
        (tmp_path / "protocol.yaml").write_text(PROTOCOL)
        env = {**vetd_env(), "SLURM_CONF": str(slurm.conf)}
        done = subprocess.run(["srun", "-N", "4", "--ntasks-per-node=1", *vetd_argv(
            "vet", "--config", str(tmp_path / "agent.toml"), "--protocol", str(tmp_path / "protocol.yaml"),
            "--need", "3", "--json", "--good-file", "good", "--bad-file", "bad")],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        verdicts = _verdicts(done.stdout)
        assert {n: v["verdict"] for n, v in verdicts.items()} == {
            "nid001": "good", "nid002": "good", "nid003": "bad", "nid004": "good"}, done.stdout
        assert (tmp_path / "good").read_text() == "nid[001-002,004]\n"
        assert (tmp_path / "bad").read_text() == "nid003\n"
    finally:
        if slurm is not None:
            slurm.stop()
        nodes.stop()


@pytest.mark.mosquitto
def test_the_verdict_goes_to_the_nodes_agent_tagged_with_the_job(net: NetNodes, tmp_path: Path,
                                                                  mosquitto: Mosquitto, cluster_name: str) -> None:
    sock = str(tmp_path / "agent.sock")
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    (tmp_path / "node.toml").write_text('[agent]\nshutdown_grace = "1s"\ndisable_plugins = ["gpu_health", "gpu_compute", "nccl"]\n')
    agent = VetdProcess(["agent", "--config", str(tmp_path / "node.toml")], tmp_path / "agent.log",
                        vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001",
                                 VETD_CONTROL_SOCKET=sock)).start()
    try:
        wait_for(lambda: Path(sock).exists(), 20, "the agent's control socket")
        refused = ask(sock, {"op": "report", "check": "host_memory", "results": [{"status": "pass"}]}, 5)
        assert not refused["ok"] and "a check this agent runs" in refused["error"]
        # only nid001 has an agent (the socket is a file: reachable from its namespace)
        done = _job(net, tmp_path, node_env={"nid001": {"VETD_CONTROL_SOCKET": sock}}).start().wait()
        assert {d.returncode for d in done.values()} == {0}, done["nid001"].stderr[-2000:]
        found = wait_for(lambda: [m for m in watcher.select(lambda m: isinstance(m, Result))
                                  if m.check == "fabric_pairs"], 20, "fabric_pairs on the wire")
        (result,) = found
        assert isinstance(result, Result)
        assert (result.node, result.entity, result.status, result.job_id) == ("nid001", "node", "pass", "4242")
        assert result.metrics["pairs"] == 3 and result.metrics["pair_gbps_median"] > 0
        assert "3 pairs" in result.message
        # a reported result is not the node's own verdict: the service state ignores it
        assert all(v["check"] != "fabric_pairs" for v in ask(sock, {"op": "verdicts"}, 5)["verdicts"])
    finally:
        assert agent.stop() == 0
        watcher.close()
