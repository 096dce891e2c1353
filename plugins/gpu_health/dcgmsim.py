"""A simulated dcgm-exporter: a scenario's GPUs as NVIDIA's Prometheus exporter shows them.

Sites that run DCGM mostly run it with ``dcgm-exporter`` (``:9400/metrics``).
:func:`exporter_text` writes a scenario's snapshot in its format, one sample per
GPU and field, with its labels (``gpu``, ``UUID``, ``pci_bus_id``, ``device``,
``modelName``, ``Hostname``, ``DCGM_FI_DRIVER_VERSION``) and its units:

* profiling fields 1002-1008 (``DCGM_FI_PROF_SM_ACTIVE``, ``_SM_OCCUPANCY``,
  ``_PIPE_TENSOR_ACTIVE``, ``_DRAM_ACTIVE``, ``_PIPE_FP64/FP32/FP16_ACTIVE``)
  as ratios from 0 to 1 (the snapshot's percentages / 100);
* 1009-1012 (``DCGM_FI_PROF_PCIE_TX/RX_BYTES``, ``_NVLINK_TX/RX_BYTES``) in
  bytes per second;
* a few device fields (``DCGM_FI_DEV_GPU_UTIL`` %, ``_FB_USED`` MiB,
  ``_POWER_USAGE`` W, ``_SM_CLOCK`` MHz, ``_GPU_TEMP`` °C).

``fields = "profiling"`` serves every profiling field (the exporter run with
them all enabled in its counters CSV); ``"default"`` what dcgm-exporter's
shipped ``dcp-metrics-included.csv`` enables: ``GR_ENGINE_ACTIVE``, tensor,
DRAM and PCIe, but not SM activity and occupancy (commented out there).

:class:`SimulatedExporter` serves it over HTTP, each request a fresh snapshot
of the scenario (its clock starts with the server); ``vetd nvml-sim
dcgm-exporter SCENARIO`` runs it from the command line, so the telemetry
plugin's ``profiling = "dcgm"`` scrapes it as it would the real exporter. A
scenario ``hang`` leaves requests unanswered (a stuck host engine); before its
``driver_ready_at`` the server answers 503. The state is the scenario's
(:mod:`~vetd.plugins.gpu_health.replay`): this module adds none of its own.
"""

from __future__ import annotations

import http.server
import socket
import threading
from typing import Any, Literal

from vetd.plugins.gpu_health.model import GpuSnapshot, NodeSnapshot
from vetd.plugins.telemetry.dcgm import FIELDS

#: dcgm-exporter's help text of each profiling field, as its CSVs word it.
HELP: dict[str, str] = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "Ratio of time the graphics engine is active.",
    "DCGM_FI_PROF_SM_ACTIVE": "The ratio of cycles an SM has at least 1 warp assigned.",
    "DCGM_FI_PROF_SM_OCCUPANCY": "The ratio of number of warps resident on an SM.",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "Ratio of cycles the tensor (HMMA) pipe is active.",
    "DCGM_FI_PROF_DRAM_ACTIVE": "Ratio of cycles the device memory interface is active sending or receiving data.",
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": "Ratio of cycles the fp64 pipes are active.",
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": "Ratio of cycles the fp32 pipes are active.",
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": "Ratio of cycles the fp16 pipes are active.",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "The rate of data transmitted over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "The rate of data received over the PCIe bus - including both protocol headers and data payloads - in bytes per second.",
    "DCGM_FI_PROF_NVLINK_TX_BYTES": "The rate of data transmitted over NVLink, not including protocol headers, in bytes per second.",
    "DCGM_FI_PROF_NVLINK_RX_BYTES": "The rate of data received over NVLink, not including protocol headers, in bytes per second.",
}
#: DCGM field → (help text, GpuSnapshot field, factor to DCGM's unit): the telemetry plugin's table read
#: backwards (one place for the fields and units), and the graphics engine, which it does not read.
PROFILING_FIELDS: dict[str, tuple[str, str, float]] = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": (HELP["DCGM_FI_PROF_GR_ENGINE_ACTIVE"], "utilization_pct", 0.01),
    **{field: (HELP[field], metric, 1.0 / factor) for field, (metric, factor) in FIELDS.items()},
}
DEVICE_FIELDS: dict[str, tuple[str, str, float]] = {
    "DCGM_FI_DEV_SM_CLOCK": ("SM clock frequency (in MHz).", "clock_sm_mhz", 1.0),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", "temp_c", 1.0),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", "power_w", 1.0),
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", "utilization_pct", 1.0),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", "memory_used_mib", 1.0),
}
#: What dcgm-exporter's shipped dcp-metrics-included.csv enables of the profiling fields.
DEFAULT_PROFILING = ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE",
                     "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES")
FieldSet = Literal["profiling", "default"]
FIELD_SETS: tuple[FieldSet, ...] = ("profiling", "default")


def field_names(fields: FieldSet) -> list[str]:
    profiling = list(PROFILING_FIELDS) if fields == "profiling" else list(DEFAULT_PROFILING)
    return [*DEVICE_FIELDS, *profiling]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(gpu: GpuSnapshot, driver: str, hostname: str) -> str:
    labels = {"gpu": str(gpu.index), "UUID": gpu.uuid, "pci_bus_id": gpu.pci_bus_id, "device": f"nvidia{gpu.index}",
              "modelName": gpu.name, "Hostname": hostname, "DCGM_FI_DRIVER_VERSION": driver}
    return ",".join(f'{key}="{_label(str(value))}"' for key, value in labels.items())


def exporter_text(snapshot: NodeSnapshot, fields: FieldSet = "profiling", hostname: str = "") -> str:
    """The snapshot's GPUs as dcgm-exporter's ``/metrics`` page (a field the GPU lacks is left out)."""
    table = {**DEVICE_FIELDS, **PROFILING_FIELDS}
    gpus = [gpu for gpu in snapshot.gpus if not gpu.no_permission]
    driver, host = snapshot.driver_version or "", hostname or socket.gethostname()
    lines: list[str] = []
    for name in field_names(fields):
        help_text, attribute, factor = table[name]
        samples = [(gpu, getattr(gpu, attribute)) for gpu in gpus]
        samples = [(gpu, value) for gpu, value in samples if value is not None]
        if not samples:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f"{name}{{{_labels(gpu, driver, host)}}} {_number(float(value) * factor)}" for gpu, value in samples]
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return f"{value:.6f}" if abs(value) < 1e6 else f"{value:.0f}"


class SimulatedExporter:
    """dcgm-exporter's HTTP endpoint (``/metrics``) for a scenario, on a port of its own."""

    def __init__(self, scenario: str, host: str = "127.0.0.1", port: int = 0, fields: FieldSet = "profiling",
                 hostname: str = "") -> None:
        """Raises :class:`~vetd.agent.api.SourceUnavailable` for a scenario that cannot be read."""
        from vetd.plugins.gpu_health.replay import ScenarioSource

        self.source = ScenarioSource(scenario)
        self.fields, self.hostname = fields, hostname
        self.requests = 0
        exporter = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's name
                exporter.requests += 1
                if self.path.split("?")[0] != "/metrics":
                    self._answer(404, b"404 page not found\n")
                    return
                status, body = exporter.page()
                self._answer(status, body)

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # http.server's signature
                pass  # quiet, as the real exporter is per request

        self.server = http.server.ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True  # a request held by a scenario `hang` does not block shutdown
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host if isinstance(host, str) else host.decode()}:{port}/metrics"

    def page(self) -> tuple[int, bytes]:
        """(HTTP status, body) of ``/metrics`` now."""
        from vetd.agent.api import SourceUnavailable

        try:
            snapshot = self.source.snapshot()  # a scenario `hang` blocks here, as a stuck host engine would
        except SourceUnavailable as exc:
            return 503, f"Failed to collect metrics: {exc}\n".encode()
        return 200, exporter_text(snapshot, self.fields, self.hostname).encode()

    def start(self) -> SimulatedExporter:
        self._thread = threading.Thread(target=self.server.serve_forever, name="vetd.dcgmsim", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> SimulatedExporter:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()


def serve(scenario: str, host: str, port: int, fields: FieldSet, hostname: str = "") -> int:
    """``vetd nvml-sim dcgm-exporter``: serve until SIGTERM or SIGINT; prints the URL once listening."""
    import signal
    import sys

    from vetd.agent.api import SourceUnavailable

    try:
        exporter = SimulatedExporter(scenario, host, port, fields, hostname)
    except (SourceUnavailable, OSError) as exc:
        print(f"vetd: nvml-sim dcgm-exporter: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with exporter:
        print(f"serving {exporter.url} ({fields} fields of {scenario})", flush=True)
        stop.wait()
    return 0
