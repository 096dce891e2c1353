"""The telemetry plugin: GPU samples through the simulated NVML and its GPM, host samples, windows
published by a real agent and tagged with the job on each GPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.procs import VetdProcess, Watcher, run_vetd, vetd_env
from tests.support.services import Mosquitto
from tests.support.wait import wait_for
from vetd.agent.checks import PluginConfigs
from vetd.agent.controlclient import ask
from vetd.core.protocol import Telemetry
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.workload import PROFILES
from vetd.plugins.telemetry import nvml_source
from vetd.plugins.telemetry.gpu import GpuSampler
from vetd.plugins.telemetry.host import HostSampler

GPM = ("sm_active_pct", "sm_occupancy_pct", "tensor_active_pct", "dram_active_pct", "fp64_active_pct",
       "fp32_active_pct", "fp16_active_pct")


def sampler(tmp_path: Path, scenario: str, through_nvml: bool = True, gpm: bool = True) -> GpuSampler:
    path = tmp_path / "scenario.yaml"
    path.write_text(scenario)
    configs = PluginConfigs({"gpu_health": GpuHealthConfig(source="scenario", scenario=str(path),
                                                           through_nvml=through_nvml)})
    return GpuSampler(nvml_source(configs), profiling="gpm" if gpm else "off")


@pytest.mark.parametrize("through_nvml", [True, False])
def test_gpu_samples_follow_the_scenario_workload_through_nvml_and_gpm(tmp_path: Path, through_nvml: bool) -> None:
    """Both ways gpu_health may read a scenario: the telemetry plugin reads it through the simulated NVML."""
    gpus = sampler(tmp_path, "gpus: 4\nworkload:\n  - {profile: training, noise: 0}\n"
                             "  - {gpus: [1], profile: training, scale: 0.5, noise: 0}\n  - {gpus: [2], profile: idle}\n",
                   through_nvml=through_nvml)
    first = gpus.sample()
    assert set(first) == {"gpu0", "gpu1", "gpu2", "gpu3"}
    assert not set(GPM) & set(first["gpu0"])  # GPM needs two samples
    time.sleep(0.3)
    sample = gpus.sample()
    training = PROFILES["training"]
    gpu0, gpu1, gpu2 = sample["gpu0"], sample["gpu1"], sample["gpu2"]
    assert gpu0["sm_active_pct"] == pytest.approx(training["sm_active_pct"])
    assert gpu0["tensor_active_pct"] == pytest.approx(training["tensor_active_pct"])
    assert gpu1["sm_active_pct"] == pytest.approx(training["sm_active_pct"] / 2)
    assert gpu2["sm_active_pct"] == 0.0 and gpu2["utilization_pct"] == 0.0 and gpu2["power_w"] == 75.0
    assert gpu0["utilization_pct"] == 97.0 and gpu0["memory_used_mib"] == 70000.0
    assert gpu0["memory_used_pct"] == pytest.approx(100 * 70000 / 81559)
    assert gpu0["power_w"] == pytest.approx(610.0) and gpu0["clock_sm_mhz"] == 1755.0
    assert gpu0["nvlink_tx_mib_s"] == pytest.approx(60000.0) and gpu0["pcie_rx_mib_s"] == pytest.approx(1200.0)
    assert gpu0["energy_j"] > first["gpu0"]["energy_j"]
    assert gpu0["throttle_power_pct"] == 0.0


def test_a_gpu_without_gpm_gives_nvml_counters_only_and_a_lost_gpu_is_left_out(tmp_path: Path) -> None:
    gpus = sampler(tmp_path, "gpus: 2\nbase: {gpm_supported: false}\nworkload:\n  - {profile: gemm, noise: 0}\n"
                             "timeline:\n  - {at: 0s, gpu: 1, vanish: true}\n")
    gpus.sample()
    time.sleep(0.3)
    sample = gpus.sample()
    assert set(sample) == {"gpu0"}
    gpu0 = sample["gpu0"]
    assert not set(GPM) & set(gpu0)
    assert gpu0["utilization_pct"] == 99.0 and gpu0["throttle_power_pct"] == 100.0  # gemm sits at its power cap
    # without GPM, PCIe and NVLink come from the driver's byte counters: rates between the two samples
    assert gpu0["pcie_tx_mib_s"] == pytest.approx(20.0, rel=0.2)


def test_the_host_sampler_reports_cpu_memory_and_io_rates() -> None:
    host = HostSampler()
    first = host.sample()["node"]
    assert {"cpu_pct", "memory_used_pct", "load1"} <= set(first) and "net_rx_mib_s" not in first
    time.sleep(0.05)
    second = host.sample()["node"]
    assert {"net_rx_mib_s", "net_tx_mib_s"} <= set(second) and second["net_rx_mib_s"] >= 0
    assert 0 < second["memory_used_pct"] < 100


def test_a_bad_window_stops_the_agent_with_file_line_and_key(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ncluster = "c"\n[plugins.telemetry]\ninterval = "2s"\nwindow = "1s"\n')
    done = run_vetd("plugins", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"vetd: config error: {config}:3: plugins.telemetry: window = 1s: must be from interval (2s) to 1h"]


def test_the_agent_publishes_windows_tagged_with_the_job_on_each_gpu(
        tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    scenario = tmp_path / "node.yaml"
    scenario.write_text("gpus: 2\nworkload:\n  - {profile: training}\n")
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\nscenario = "{scenario}"\n'
                      f'through_nvml = true\nkmsg = false\ntelemetry = false\n'
                      f'[plugins.telemetry]\ninterval = "200ms"\nwindow = "1s"\n')
    env = vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001")
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/node/+/telemetry")
    agent = VetdProcess(["agent", "--config", str(config)], tmp_path / "agent.log", env).start()

    def windows(entity: str) -> list[Telemetry]:
        return [m for m in watcher.select(lambda m: isinstance(m, Telemetry) and m.entity == entity)  # type: ignore[misc]
                if m.window_s]

    try:
        first = wait_for(lambda: windows("gpu1"), 20, "a window of gpu1")[0]
        assert first.source == "telemetry_gpu" and first.window_s == 1.0 and first.ts % 1.0 == 0
        assert first.job_id is None
        wait_for(lambda: windows("node"), 10, "a window of the host")
        socket_path = env["VETD_CONTROL_SOCKET"]
        assert ask(socket_path, {"op": "job_start", "job_id": "4242", "gpus": "1"}, 5)["ok"]
        started = time.time()
        tagged = wait_for(lambda: [w for w in windows("gpu1") if w.ts >= started], 10, "a window after job_start")
        gpu1 = tagged[0]
        assert gpu1.job_id == "4242" and 3 <= gpu1.samples <= 6
        assert gpu1.min["sm_active_pct"] <= gpu1.metrics["sm_active_pct"] <= gpu1.max["sm_active_pct"]
        assert gpu1.metrics["utilization_pct"] > 90
        gpu0 = wait_for(lambda: [w for w in windows("gpu0") if w.ts >= started], 10, "gpu0 after job_start")[0]
        assert gpu0.job_id is None  # the job has GPU 1 only
    finally:
        agent.stop(timeout=10)
        watcher.close()


@pytest.mark.parametrize("older", [False, True])
def test_the_older_single_sample_sources_are_off_unless_asked_for(tmp_path: Path, older: bool) -> None:
    """The controller keeps only windows: by default the agent sends the telemetry plugin's and not
    also a single sample per GPU and per node every telemetry_interval, which it would drop."""
    from vetd.agent.config import load_agent_config
    from vetd.agent.pluginhost import PluginHost

    scenario = tmp_path / "node.yaml"
    scenario.write_text("gpus: 2\n")
    extra = "telemetry = true\n" if older else ""
    (tmp_path / "agent.toml").write_text(
        f'[plugins.gpu_health]\nsource = "scenario"\nscenario = "{scenario}"\nkmsg = false\n{extra}'
        f"[plugins.host]\n{extra}")
    names = PluginHost(load_agent_config(tmp_path / "agent.toml", environ={})).register_telemetry().names()
    assert sorted(names) == (["gpu", "host", "telemetry_gpu", "telemetry_host"] if older
                             else ["telemetry_gpu", "telemetry_host"])
