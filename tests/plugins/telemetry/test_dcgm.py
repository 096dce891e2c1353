"""Profiling metrics from dcgm-exporter ([plugins.telemetry] profiling = "dcgm" / "auto"): the fields and
their units, the GPU by UUID, auto's choice, an exporter that is away, hung or talks nonsense, and a real
agent's windows through to `vetd job report`. The exporter is the simulated one (vetd nvml-sim
dcgm-exporter), scraped over HTTP; NVML is the simulated libnvidia-ml."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from tests.support.procs import VetdProcess, Watcher, run_vetd, vetd_env
from tests.support.services import Mosquitto, free_port
from tests.support.wait import wait_for
from vetd.agent.checks import PluginConfigs
from vetd.agent.controlclient import ask
from vetd.controller.config import ReportSection
from vetd.controller.jobreport import build, gssr, text
from vetd.controller.telemetry import TelemetryStore
from vetd.core.configfile import dec_hook
from vetd.core.protocol import Telemetry
from vetd.plugins.gpu_health.config import GpuHealthConfig
from vetd.plugins.gpu_health.dcgmsim import PROFILING_FIELDS, SimulatedExporter
from vetd.plugins.gpu_health.workload import PROFILES
from vetd.plugins.telemetry import nvml_source
from vetd.plugins.telemetry.config import TelemetryConfig
from vetd.plugins.telemetry.dcgm import FIELDS, MIB, parse
from vetd.plugins.telemetry.gpu import DCGM_FAILED, DCGM_MARK, GpuSampler

ACTIVITIES = ("sm_active_pct", "sm_occupancy_pct", "tensor_active_pct", "dram_active_pct", "fp64_active_pct",
              "fp32_active_pct", "fp16_active_pct")
TRAINING = PROFILES["training"]
#: The node's GPUs as NVML serves them: training at full speed ...
NODE = "gpus: 2\n{base}workload:\n  - {{profile: training, noise: 0}}\n"
#: ... and as the exporter serves them: at 40 % (the same UUIDs), so each value shows which source gave it.
EXPORTER = "gpus: 2\nworkload:\n  - {profile: training, scale: 0.4, noise: 0}\n"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def sampler(tmp_path: Path, profiling: str, url: str, gpm: bool = True, **kwargs: float) -> GpuSampler:
    scenario = write(tmp_path / "node.yaml", NODE.format(base="" if gpm else "base: {gpm_supported: false}\n"))
    configs = PluginConfigs({"gpu_health": GpuHealthConfig(source="scenario", scenario=scenario, through_nvml=True)})
    return GpuSampler(nvml_source(configs), profiling=profiling, dcgm_url=url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[SimulatedExporter]:
    with SimulatedExporter(write(tmp_path / "exporter.yaml", EXPORTER)) as served:
        yield served


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}/metrics"


def two_samples(gpus: GpuSampler) -> dict[str, dict[str, float]]:
    """The second sample (GPM measures between two)."""
    gpus.sample()
    time.sleep(0.2)
    return gpus.sample()


def test_the_fields_become_gpm_s_names_and_units_matched_by_uuid_not_by_dcgm_s_gpu_id() -> None:
    # DCGM's gpu id 0 is the card NVML calls GPU-B here; a MIG instance and values that are no number are skipped
    page = "\n".join([
        "# HELP DCGM_FI_PROF_SM_ACTIVE The ratio of cycles an SM has at least 1 warp assigned.",
        "# TYPE DCGM_FI_PROF_SM_ACTIVE gauge",
        'DCGM_FI_PROF_SM_ACTIVE{gpu="0",UUID="GPU-B",device="nvidia0",modelName="NVIDIA A100",Hostname="n1"} 0.625',
        'DCGM_FI_PROF_SM_ACTIVE{gpu="1",UUID="GPU-A",device="nvidia1",modelName="NVIDIA A100",Hostname="n1"} 0.25',
        'DCGM_FI_PROF_SM_ACTIVE{gpu="1",UUID="GPU-A",GPU_I_ID="3",GPU_I_PROFILE="1g.10gb"} 0.99',
        "# TYPE DCGM_FI_PROF_PCIE_TX_BYTES gauge",
        'DCGM_FI_PROF_PCIE_TX_BYTES{gpu="0",UUID="GPU-B"} 3145728',
        'DCGM_FI_PROF_NVLINK_RX_BYTES{gpu="0",UUID="GPU-B"} 1.048576e+09',
        'DCGM_FI_PROF_PIPE_FP64_ACTIVE{gpu="0",UUID="GPU-B"} NaN',
        'DCGM_FI_PROF_DRAM_ACTIVE{gpu="0",UUID="GPU-B"} -1',
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-B"} 41',
        'DCGM_FI_PROF_SM_OCCUPANCY{gpu="0"} 0.5',  # no UUID: cannot be placed
    ]) + "\n"
    assert parse(page) == {"GPU-B": {"sm_active_pct": 62.5, "pcie_tx_mib_s": 3145728 / MIB,
                                     "nvlink_rx_mib_s": 1.048576e9 / MIB},
                           "GPU-A": {"sm_active_pct": 25.0}}
    assert {name for name, (metric, _) in FIELDS.items() if metric.endswith("_pct")} < set(PROFILING_FIELDS)


def test_the_simulated_exporter_serves_the_scenario_in_dcgm_s_units(exporter: SimulatedExporter,
                                                                    tmp_path: Path) -> None:
    import urllib.request

    with urllib.request.urlopen(exporter.url, timeout=5) as response:
        page = response.read().decode()
    assert 'UUID="GPU-5ce0a1e0-0000-4000-8000-000000000001"' in page and 'device="nvidia1"' in page
    assert "DCGM_FI_PROF_SM_ACTIVE{" in page and "# TYPE DCGM_FI_PROF_PIPE_TENSOR_ACTIVE gauge" in page
    gpus = parse(page)
    assert len(gpus) == 2
    for metric in ACTIVITIES:
        assert gpus["GPU-5ce0a1e0-0000-4000-8000-000000000001"][metric] == pytest.approx(0.4 * TRAINING[metric])
    assert gpus["GPU-5ce0a1e0-0000-4000-8000-000000000000"]["nvlink_tx_mib_s"] == pytest.approx(
        0.4 * TRAINING["nvlink_tx_mib_s"])
    # dcgm-exporter's shipped CSV leaves SM activity and occupancy out
    with (SimulatedExporter(write(tmp_path / "default.yaml", EXPORTER), fields="default") as default,
          urllib.request.urlopen(default.url, timeout=5) as response):
        served = parse(response.read().decode())
    assert set(served["GPU-5ce0a1e0-0000-4000-8000-000000000000"]) == {
        "tensor_active_pct", "dram_active_pct", "pcie_tx_mib_s", "pcie_rx_mib_s"}


def test_dcgm_gives_a_gpu_without_gpm_its_profiling_metrics_nvml_keeps_its_own(
        tmp_path: Path, exporter: SimulatedExporter) -> None:
    """An A100-like GPU (no GPM): the saturation score's inputs come from DCGM; utilisation, power and the
    PCIe/NVLink rates stay NVML's (its byte counters, every sample)."""
    sample = two_samples(sampler(tmp_path, "dcgm", exporter.url, gpm=False, dcgm_timeout=2.0))
    for gpu in ("gpu0", "gpu1"):
        values = sample[gpu]
        for metric in ACTIVITIES:
            assert values[metric] == pytest.approx(0.4 * TRAINING[metric]), metric
        assert values[DCGM_MARK] == 1.0 and DCGM_FAILED not in values
        assert values["utilization_pct"] == TRAINING["utilization_pct"]
        # a rate between two samples of the driver's counters (timed loosely under load), not DCGM's 40 %
        assert 0.7 < values["nvlink_tx_mib_s"] / TRAINING["nvlink_tx_mib_s"] < 1.5


@pytest.mark.parametrize(("served", "gpm", "chosen"), [
    ("profiling", True, "dcgm"),   # the exporter has SM activity and occupancy: DCGM, GPM never asked
    ("default", True, "gpm"),      # it lacks them (its shipped CSV): GPM has them
    (None, True, "gpm"),           # no exporter on the node
    (None, False, None),           # no exporter and no GPM: no profiling metrics, none invented
])
def test_auto_takes_dcgm_when_it_serves_the_score_s_inputs_else_gpm_else_nothing(
        tmp_path: Path, served: str | None, gpm: bool, chosen: str | None) -> None:
    exporter = (SimulatedExporter(write(tmp_path / "exporter.yaml", EXPORTER), fields=served).start()  # type: ignore[arg-type]
                if served else None)
    try:
        gpus = sampler(tmp_path, "auto", exporter.url if exporter else closed_url(), gpm=gpm)
        values = two_samples(gpus)["gpu0"]
    finally:
        if exporter:
            exporter.close()
    if chosen is None:
        assert not set(ACTIVITIES) & set(values) and DCGM_MARK not in values
        return
    scale = 0.4 if chosen == "dcgm" else 1.0
    for metric in ACTIVITIES:
        assert values[metric] == pytest.approx(scale * TRAINING[metric]), metric
    assert (DCGM_MARK in values) == (chosen == "dcgm") and DCGM_FAILED not in values
    assert not gpus.last_gpm if chosen == "dcgm" else gpus.last_gpm[0]["sm_active_pct"] == TRAINING["sm_active_pct"]


@pytest.mark.parametrize("profiling", ["gpm", "off"])
def test_gpm_and_off_never_ask_the_exporter(tmp_path: Path, exporter: SimulatedExporter, profiling: str) -> None:
    values = two_samples(sampler(tmp_path, profiling, exporter.url))["gpu0"]
    assert exporter.requests == 0 and DCGM_MARK not in values
    if profiling == "gpm":
        assert values["sm_active_pct"] == TRAINING["sm_active_pct"]
    else:
        assert not set(ACTIVITIES) & set(values) and values["utilization_pct"] == TRAINING["utilization_pct"]


def test_auto_moves_a_gpu_from_gpm_to_dcgm_without_mixing_them(tmp_path: Path) -> None:
    """Read at every sample (no window): the exporter appears while the GPU is on GPM; the sample that sees
    it carries neither source, the next DCGM's only."""
    port = free_port()
    gpus = sampler(tmp_path, "auto", f"http://127.0.0.1:{port}/metrics")
    assert two_samples(gpus)["gpu0"]["sm_active_pct"] == TRAINING["sm_active_pct"]  # GPM
    with SimulatedExporter(write(tmp_path / "exporter.yaml", EXPORTER), port=port):
        switching = gpus.sample()["gpu0"]
        assert not set(ACTIVITIES) & set(switching) and DCGM_MARK not in switching
        after = gpus.sample()["gpu0"]
        assert after["sm_active_pct"] == pytest.approx(0.4 * TRAINING["sm_active_pct"]) and after[DCGM_MARK] == 1.0
    gone = gpus.sample()["gpu0"]  # the exporter went away: GPM again, from a fresh GPM sample
    assert gone[DCGM_FAILED] == 1.0 and not set(ACTIVITIES) & set(gone)
    time.sleep(0.2)
    assert gpus.sample()["gpu0"]["sm_active_pct"] == TRAINING["sm_active_pct"]


class Nonsense(http.server.BaseHTTPRequestHandler):
    """Something on the exporter's port that does not speak Prometheus."""

    def do_GET(self) -> None:  # http.server's name
        if self.path.startswith("/trickle"):  # a page that comes a line every 0.1 s, for 10 s
            self.send_response(200)
            self.end_headers()
            for i in range(100):
                self.wfile.write(f"# HELP line {i}\n".encode())
                self.wfile.flush()
                time.sleep(0.1)
            return
        body = b"<html><body>It works!</body></html>\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def nonsense() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Nonsense)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("broken", ["unreachable", "malformed", "hung", "trickling"])
def test_a_broken_exporter_is_counted_logged_once_and_the_window_has_no_profiling_metrics(
        tmp_path: Path, nonsense: str, broken: str) -> None:
    hung = None
    if broken == "hung":  # a host engine that stopped answering: the request waits for dcgm_timeout
        hung = SimulatedExporter(write(tmp_path / "hung.yaml", "gpus: 2\ntimeline:\n  - {at: 0s, hang: true}\n"))
        hung.start()
    url = {"unreachable": closed_url(), "malformed": nonsense, "hung": hung.url if hung else "",
           "trickling": nonsense.replace("/metrics", "/trickle")}[broken]
    gpus = sampler(tmp_path, "dcgm", url, dcgm_timeout=0.5)
    try:
        with capture_logs() as logs:
            began = time.monotonic()
            samples = [gpus.sample() for _ in range(3)]
            # dcgm_timeout bounds the whole reading, not each recv: a trickle would take 10 s a sample
            assert time.monotonic() - began < 3 * 2.0
    finally:
        if hung:
            hung.close()
    kind = "malformed" if broken == "malformed" else "unreachable"
    assert gpus.dcgm is not None and gpus.dcgm.failures == {kind: 3} and gpus.dcgm.scrapes == 0
    assert [(e["event"], e["kind"], e["log_level"]) for e in logs if e["event"].startswith("dcgm_exporter")] == [
        ("dcgm_exporter_failed", kind, "warning")]
    for sample in samples:
        values = sample["gpu0"]
        assert values[DCGM_FAILED] == 1.0 and not set(ACTIVITIES) & set(values) and DCGM_MARK not in values
        assert values["utilization_pct"] == TRAINING["utilization_pct"]  # NVML's own metrics go on


@pytest.mark.parametrize(("table", "why"), [
    ('profiling = "dcgm"\ndcgm_url = "localhost:9400"\n',
     "dcgm_url = 'localhost:9400': must be an http:// or https:// URL with a host (dcgm-exporter's is "
     "http://localhost:9400/metrics)"),
    ('profiling = "dcgm"\ngpm = true\n',
     'gpm and profiling = "dcgm" both set: gpm was replaced by profiling, keep profiling alone'),
])
def test_a_bad_telemetry_table_stops_the_agent_with_file_line_and_key(tmp_path: Path, table: str, why: str) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ncluster = "c"\n[plugins.telemetry]\n{table}')
    done = run_vetd("plugins", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"vetd: config error: {config}:3: plugins.telemetry: {why}"]


@pytest.mark.parametrize(("gpm", "profiling"), [("true", "gpm"), ("false", "off")])
def test_an_older_agent_toml_with_gpm_still_loads_as_the_profiling_it_meant(gpm: str, profiling: str) -> None:
    """`gpm` came before `profiling`: a config copied from the older sample must not stop the agent."""
    config = msgspec.toml.decode(f"gpm = {gpm}\n", type=TelemetryConfig, dec_hook=dec_hook)
    assert config.profiling == profiling


def test_an_agent_s_windows_carry_dcgm_s_values_through_to_the_job_report(
        tmp_path: Path, mosquitto: Mosquitto, cluster_name: str) -> None:
    """`vetd nvml-sim dcgm-exporter` beside a real agent with profiling = "dcgm": the windows carry the
    exporter's values, read once per window, and the report says where they came from."""
    node = write(tmp_path / "node.yaml", NODE.format(base="base: {gpm_supported: false}\n"))
    port = free_port()
    env = vetd_env(VETD_BROKER=mosquitto.url, VETD_CLUSTER=cluster_name, VETD_NODE="nid001")
    exporter = VetdProcess(["nvml-sim", "dcgm-exporter", write(tmp_path / "exporter.yaml", EXPORTER),
                            "--listen", f"127.0.0.1:{port}"], tmp_path / "exporter.log", env).start()
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ninterval = "1h"\n[plugins.gpu_health]\nsource = "scenario"\nscenario = "{node}"\n'
                      'through_nvml = true\nkmsg = false\ntelemetry = false\n[plugins.telemetry]\ninterval = "250ms"\n'
                      f'window = "1s"\nprofiling = "dcgm"\ndcgm_url = "http://127.0.0.1:{port}/metrics"\nhost = false\n')
    watcher = Watcher(mosquitto.port, f"vetd/v1/{cluster_name}/node/+/telemetry")
    agent = VetdProcess(["agent", "--config", str(config)], tmp_path / "agent.log", env).start()

    def windows() -> list[Telemetry]:
        return [m for m in watcher.select(lambda m: isinstance(m, Telemetry) and m.job_id == "77")  # type: ignore[misc]
                if m.window_s]

    try:
        wait_for(lambda: "serving http://" in exporter.output, 15, "the simulated exporter")
        wait_for(lambda: Path(env["VETD_CONTROL_SOCKET"]).exists(), 15, "the agent's control socket")
        wait_for(lambda: ask(env["VETD_CONTROL_SOCKET"], {"op": "job_start", "job_id": "77", "gpus": "0,1"},
                             2)["ok"], 20, "the agent takes the job")
        got = wait_for(lambda: (w := windows()) and len({x.entity for x in w}) == 2 and len(w) >= 6 and w, 30,
                       "three windows of each GPU with the job")
    finally:
        agent.stop(timeout=10)
        exporter.stop(timeout=10)
        watcher.close()
    full = [w for w in got if w.samples >= 3]  # whole windows (the first may have started before the job)
    assert full
    for window in full:
        assert window.metrics[DCGM_MARK] == 1.0 and DCGM_FAILED not in window.metrics
        for metric in ACTIVITIES:  # one reading per window: its min, mean and max are that reading
            assert window.min[metric] == window.metrics[metric] == window.max[metric] == pytest.approx(
                0.4 * TRAINING[metric])
        assert window.metrics["utilization_pct"] == TRAINING["utilization_pct"]  # NVML's, every sample
    store = TelemetryStore(tmp_path / "telemetry.db")
    try:
        store.add(got, time.time())
        report = build("77", store.job_series("77", cluster_name), None, ReportSection())
    finally:
        store.close()
    assert report is not None
    document = report.to_json()
    assert document["job"]["profiling"] == "dcgm" and document["job"]["score_kind"] == "gssr"
    assert {g["profiling"] for g in document["gpus"]} == {"dcgm"}
    assert all(g["profiling_windows"]["dcgm"] == g["windows"] for g in document["gpus"])
    assert "profiling_dcgm" not in document["gpus"][0]["mean"]
    fp = sum(0.4 * TRAINING[m] for m in ("tensor_active_pct", "fp64_active_pct", "fp32_active_pct",
                                         "fp16_active_pct")) / 100
    assert report.score == pytest.approx(gssr(0.4 * TRAINING["sm_active_pct"] / 100, fp,
                                              0.4 * TRAINING["sm_occupancy_pct"] / 100), abs=1e-3)
    assert "profiling metrics (SM, tensor, DRAM, FP) from dcgm-exporter" in text(report)
