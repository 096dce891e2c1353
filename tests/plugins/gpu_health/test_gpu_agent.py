"""The GPU plugin inside a real agent, publishing to a real Mosquitto."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

import pytest

from tests.support.procs import VetdProcess, Watcher, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.daemon import RECHECK_SPACING_S
from vetd.core.protocol import Event, Result, State


def start(tmp_path: Path, broker: Mosquitto, cluster: str, scenario: str, extra: str = "", **env: str) -> VetdProcess:
    (tmp_path / "scenario.yaml").write_text(scenario)
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ninterval = "300ms"\n[plugins.gpu_health]\nsource = "scenario"\n'
                      f'scenario = "{tmp_path / "scenario.yaml"}"\n{extra}')
    return VetdProcess(["agent", "--config", str(config)], tmp_path / "agent.log",
                       vetd_env(VETD_BROKER=broker.url, VETD_CLUSTER=cluster, VETD_NODE="nid001", **env)).start()


@pytest.mark.parametrize("through_nvml", [False, True], ids=["scenario", "through-nvml"])
def test_xid_and_gpu_events_are_published_at_once_with_severity(
    through_nvml: bool, tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    if through_nvml:
        pytest.importorskip("pynvml")
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    agent = start(tmp_path, mosquitto, cluster_name, """
gpus: 4
timeline:
  - {at: 1s, gpu: 2, xid: 79, message: "GPU has fallen off the bus."}
  - {at: 1s, gpu: 2, vanish: true}
  - {at: 1.5s, gpu: 1, xid: 94, message: "Contained ECC error."}
  - {at: 1.6s, gpu: 2, xid: 79, message: "same fault, second report"}
  - {at: 1.8s, gpu: 0, set: {recovery_action: Reset}, event: recovery_action}
""", extra="through_nvml = true\n" if through_nvml else "")
    try:
        def reported(m: object) -> bool:  # the NVML watcher also says, once, that GPU 2 is lost to it
            return isinstance(m, Event) and "gpu_unavailable" not in m.codes

        events: list[Event] = wait_for(lambda: watcher.select(reported) if len(
            watcher.select(reported)) >= 3 else None, 15, "two XIDs and a GPU event")
        fatal, contained, recovery = events[0], events[1], events[2]
        if through_nvml:  # its event set answers GPU_IS_LOST from then on: built again without GPU 2
            lost = wait_for(lambda: watcher.select(lambda m: isinstance(m, Event) and "gpu_unavailable" in m.codes),
                            15, "GPU 2 lost to the event set")
            assert [(e.entity, e.severity) for e in lost] == [("gpu2", "critical")]
        # severity, resolution and mnemonic from NVIDIA's catalog: rules may key on any of them
        assert (fatal.name, fatal.severity, fatal.entity, fatal.codes) == (
            "xid", "critical", "gpu2", ["xid_79", "resolution_restart_bm", "robust_channel_gpu_has_fallen_off_the_bus"])
        # NVML's event carries the number only; the kernel log (or the scenario) has the text
        assert ("reported by NVML" if through_nvml else "GPU has fallen off the bus.") in fatal.message
        assert (contained.severity, contained.entity, contained.codes[:2]) == (
            "warning", "gpu1", ["xid_94", "resolution_restart_app"])
        assert "Contained memory error" in contained.message and "NVIDIA: RESTART_APP" in contained.message
        # an NVML event other than an XID, with the code gpu_health gives the same action
        assert (recovery.name, recovery.severity, recovery.entity, recovery.codes) == (
            "gpu_event", "critical", "gpu0", ["recovery_action", "recovery_reset"])
        assert recovery.message.startswith("the driver set a recovery action for the GPU") and ": Reset [" in \
            recovery.message
        # the results reflect the vanished GPU too
        wait_for(lambda: any(isinstance(m, Result) and m.check == "gpu_health" and "gpu_missing" in m.codes
                             for m in watcher.select()), 15, "gpu_missing result")
        if through_nvml:  # the driver still lists the GPU, as lost
            wait_for(lambda: any(isinstance(m, Result) and m.entity == "gpu2" and m.codes == ["gpu_lost"]
                                 for m in watcher.select()), 15, "gpu_lost result")
        birth = next(m for m in watcher.select(lambda m: isinstance(m, State) and m.online))
        assert birth.labels["gpu_model"] == "NVIDIA H100 80GB HBM3" and birth.labels["gpu_count"] == "4"
    finally:
        assert agent.stop() == 0
    # the repeat within the de-duplication window was not published again
    assert len(watcher.select(reported)) == 3
    watcher.close()


def test_a_fatal_xid_runs_gpu_health_at_once_not_an_interval_later(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    (tmp_path / "scenario.yaml").write_text("""
gpus: 4
timeline:
  - {at: 6s, gpu: 2, xid: 79, message: "GPU has fallen off the bus."}
  - {at: 6s, gpu: 2, vanish: true}
  - {at: 6.2s, gpu: 1, xid: 13}
  - {at: 6.3s, gpu: 0, xid: 13}
""")
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\n'
                      f'scenario = "{tmp_path / "scenario.yaml"}"\n')
    agent = VetdProcess(["agent", "--config", str(config)], tmp_path / "agent.log",
                        vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001")).start()

    def node_results() -> list[Result]:
        return [m for m in watcher.select(lambda m: isinstance(m, Result))  # type: ignore[misc]
                if m.check == "gpu_health" and m.entity == "node"]

    try:
        first = wait_for(node_results, 10, "the first gpu_health run (within FIRST_RUN_SPREAD_S)")
        assert first[0].status == "pass"  # before the fault; the next periodic run is an hour away
        missing = wait_for(lambda: [r for r in node_results() if "gpu_missing" in r.codes], 15,
                           "a gpu_health run woken by the XID")
        xid = next(m for m in watcher.select(lambda m: isinstance(m, Event)) if "xid_79" in m.codes)
        assert 0 <= missing[0].ts - xid.ts < 3
        wait_for(lambda: len(watcher.select(lambda m: isinstance(m, Event))) == 3, 10, "the two XID 13s")
        time.sleep(2 * RECHECK_SPACING_S + 0.5)  # time for any run they woke
    finally:
        assert agent.stop() == 0
    # Three XIDs within 0.3 s: the first run woken answers XID 79, one more (a second
    # later, not back to back) answers both XID 13s; or a single run answers all three.
    assert len(node_results()) in (2, 3)
    watcher.close()


def test_a_hung_driver_leaves_the_watchdog_and_other_checks_running(
    tmp_path: Path, mosquitto: Mosquitto, cluster_name: str
) -> None:
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/#")
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(0.1)
        agent = start(tmp_path, mosquitto, cluster_name, "gpus: 2\ntimeline:\n  - {at: 1s, hang: true}\n",
                      'driver_timeout = "500ms"\n', NOTIFY_SOCKET=address, WATCHDOG_USEC="600000")

        def gpu_results(code: str) -> list[Result]:
            return [m for m in watcher.select(lambda m: isinstance(m, Result))  # type: ignore[misc]
                    if m.check == "gpu_health" and code in m.codes]

        try:
            wait_for(lambda: len(gpu_results("driver_unresponsive")) >= 3, 20, "driver_unresponsive results")
            pings_before = 0
            deadline_pings: list[str] = []

            def pings() -> int:
                with contextlib.suppress(TimeoutError):
                    deadline_pings.append(sock.recv(64).decode())
                return deadline_pings.count("WATCHDOG=1")

            pings_before = pings()
            wait_for(lambda: pings() >= pings_before + 4, 10, "watchdog pings while the driver hangs")
            hosts = [m for m in watcher.select(lambda m: isinstance(m, Result)) if m.check == "host_memory"]  # type: ignore[attr-defined]
            count = len(hosts)
            wait_for(lambda: len([m for m in watcher.select(lambda m: isinstance(m, Result))
                                  if m.check == "host_memory"]) > count + 2, 10, "host checks still running")
        finally:
            assert agent.stop() == 0
    stuck = gpu_results("driver_unresponsive")
    assert all(r.status == "fail" and r.entity == "node" for r in stuck)
    watcher.close()
