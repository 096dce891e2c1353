"""Profiling metrics from the node's dcgm-exporter (``[plugins.telemetry] profiling = "dcgm"`` or ``"auto"``).

Where a site runs DCGM, it mostly runs NVIDIA's dcgm-exporter with it: a
Prometheus endpoint (``http://localhost:9400/metrics``) with one sample per GPU
and DCGM field, labelled with the GPU's ``UUID`` (and ``gpu``, ``device``,
``pci_bus_id``, ``Hostname``…). :func:`parse` reads its profiling fields and
gives them the names and units of the GPM path (:mod:`~vetd.plugins.telemetry.gpu`),
so the saturation score and ``vetd job report`` read them unchanged:

========================================  ======  =======================  ======================
dcgm-exporter                             field   vetd                     unit change
========================================  ======  =======================  ======================
``DCGM_FI_PROF_SM_ACTIVE``                1002    ``sm_active_pct``        ratio 0-1 → % (× 100)
``DCGM_FI_PROF_SM_OCCUPANCY``             1003    ``sm_occupancy_pct``     ratio → %
``DCGM_FI_PROF_PIPE_TENSOR_ACTIVE``       1004    ``tensor_active_pct``    ratio → %
``DCGM_FI_PROF_DRAM_ACTIVE``              1005    ``dram_active_pct``      ratio → %
``DCGM_FI_PROF_PIPE_FP64/FP32/FP16_ACTIVE``  1006-8  ``fp64/32/16_active_pct``  ratio → %
``DCGM_FI_PROF_PCIE_TX/RX_BYTES``         1009-10 ``pcie_tx/rx_mib_s``     bytes/s → MiB/s
``DCGM_FI_PROF_NVLINK_TX/RX_BYTES``       1011-12 ``nvlink_tx/rx_mib_s``   bytes/s → MiB/s
========================================  ======  =======================  ======================

GPUs are matched by UUID to NVML's (DCGM's ``gpu`` id need not be NVML's
index); a MIG instance's samples (``GPU_I_ID`` set) are left out, vetd's GPU
entities being whole GPUs. A value that is not a finite number ≥ 0 is left out.

:class:`Exporter` fetches the page (no proxy: the exporter is this node's; at
most :data:`MAX_BYTES`) and says why it could not (:class:`ExporterError`'s
``kind``): ``unreachable`` (refused, timed out, no such host), ``http_status``,
``malformed`` (not Prometheus text), ``too_large``, ``no_parser``
(prometheus_client missing). Each failure is counted by kind; the first of a
run of failures is logged, and the recovery.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter

import structlog

log = structlog.get_logger("vetd.telemetry")

MIB = 2.0**20
#: dcgm-exporter's field → (vetd's metric, factor to vetd's unit).
FIELDS: dict[str, tuple[str, float]] = {
    "DCGM_FI_PROF_SM_ACTIVE": ("sm_active_pct", 100.0),
    "DCGM_FI_PROF_SM_OCCUPANCY": ("sm_occupancy_pct", 100.0),
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": ("tensor_active_pct", 100.0),
    "DCGM_FI_PROF_DRAM_ACTIVE": ("dram_active_pct", 100.0),
    "DCGM_FI_PROF_PIPE_FP64_ACTIVE": ("fp64_active_pct", 100.0),
    "DCGM_FI_PROF_PIPE_FP32_ACTIVE": ("fp32_active_pct", 100.0),
    "DCGM_FI_PROF_PIPE_FP16_ACTIVE": ("fp16_active_pct", 100.0),
    "DCGM_FI_PROF_PCIE_TX_BYTES": ("pcie_tx_mib_s", 1.0 / MIB),
    "DCGM_FI_PROF_PCIE_RX_BYTES": ("pcie_rx_mib_s", 1.0 / MIB),
    "DCGM_FI_PROF_NVLINK_TX_BYTES": ("nvlink_tx_mib_s", 1.0 / MIB),
    "DCGM_FI_PROF_NVLINK_RX_BYTES": ("nvlink_rx_mib_s", 1.0 / MIB),
}
#: What the saturation score needs: ``auto`` takes a GPU's profiling from the exporter only when it has both
#: (dcgm-exporter's shipped CSVs leave SM activity and occupancy commented out).
SCORE_METRICS = ("sm_active_pct", "sm_occupancy_pct")
#: The link rates, which NVML's byte counters give at every sample: DCGM's are used only where those are missing.
RATE_METRICS = ("pcie_tx_mib_s", "pcie_rx_mib_s", "nvlink_tx_mib_s", "nvlink_rx_mib_s")
#: The largest page read (dcgm-exporter's for 8 GPUs with every field is about 100 KB).
MAX_BYTES = 8 * 2**20


class ExporterError(Exception):
    """The exporter gave nothing usable; ``kind`` says why (see the module's docstring)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse(text: str) -> dict[str, dict[str, float]]:
    """``{GPU UUID: {vetd metric: value}}`` from a dcgm-exporter page (:class:`ExporterError` ``malformed``
    when it is not Prometheus text)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as exc:
        raise ExporterError("no_parser", "prometheus_client is not installed: pip install 'vetd[gpu]'") from exc
    gpus: dict[str, dict[str, float]] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                field = FIELDS.get(sample.name)
                if field is None or sample.labels.get("GPU_I_ID"):  # not ours, or a MIG instance
                    continue
                uuid = sample.labels.get("UUID") or sample.labels.get("uuid")
                value = float(sample.value)
                if not uuid or not math.isfinite(value) or value < 0:
                    continue
                metric, factor = field
                gpus.setdefault(uuid, {})[metric] = value * factor
    except (ValueError, TypeError, IndexError, KeyError) as exc:  # what the parser raises on bad input
        raise ExporterError("malformed", f"not Prometheus text: {type(exc).__name__}: {exc}") from exc
    return gpus


class Exporter:
    """The node's dcgm-exporter at ``url``; :meth:`scrape` reads it."""

    def __init__(self, url: str, timeout: float, *, expected: bool) -> None:
        """``expected``: the config asks for it (``profiling = "dcgm"``): its failures are warnings; in ``auto``
        a node without an exporter is the usual case, said once at info."""
        self.url, self.timeout, self.expected = url, timeout, expected
        #: Failed scrapes by kind, and the scrapes that succeeded.
        self.failures: Counter[str] = Counter()
        self.scrapes = 0
        self._failing: str | None = None
        self._failed_in_a_row = 0
        self._lock = threading.Lock()
        self._opener: object | None = None

    def scrape(self) -> dict[str, dict[str, float]]:
        """The exporter's profiling values by GPU UUID now (:class:`ExporterError` when it gives none: counted,
        and logged at the first failure of a run)."""
        with self._lock:
            try:
                gpus = parse(self._fetch())
            except ExporterError as exc:
                self._failed(exc)
                raise
            self.scrapes += 1
            if self._failing is not None:
                log.info("dcgm_exporter_recovered", url=self.url, failed_scrapes=self._failed_in_a_row)
                self._failing, self._failed_in_a_row = None, 0
            return gpus

    def _fetch(self) -> str:
        import urllib.error
        import urllib.request

        if self._opener is None:  # no proxy: http_proxy in the agent's environment is not for this node's port
            self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        opener: urllib.request.OpenerDirector = self._opener  # type: ignore[assignment]
        # ``timeout`` bounds the whole reading: urllib's bounds each connect or recv, so a page that
        # trickles in would hold the sampler for ever; each of those gets half, the reading stops at the end
        deadline = time.monotonic() + self.timeout
        body = bytearray()
        try:
            with opener.open(self.url, timeout=self.timeout / 2) as response:
                while len(body) <= MAX_BYTES:
                    if time.monotonic() > deadline:
                        raise ExporterError("unreachable", f"timed out: no whole page within {self.timeout:g}s")
                    if not (chunk := response.read1(65536)):
                        break
                    body += chunk
        except urllib.error.HTTPError as exc:
            raise ExporterError("http_status", f"HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, timed out, no such host
            reason = getattr(exc, "reason", exc)
            raise ExporterError("unreachable", f"{type(reason).__name__}: {reason}") from exc
        if len(body) > MAX_BYTES:
            raise ExporterError("too_large", f"more than {MAX_BYTES} bytes")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ExporterError("malformed", f"not UTF-8 text: {exc}") from exc

    def _failed(self, exc: ExporterError) -> None:
        self.failures[exc.kind] += 1
        self._failed_in_a_row += 1
        if self._failing == exc.kind:
            return
        self._failing = exc.kind
        fields = {"url": self.url, "kind": exc.kind, "error": str(exc)}
        if self.expected:
            log.warning("dcgm_exporter_failed", **fields, consequence="no profiling metrics until it answers")
        else:
            log.info("dcgm_exporter_unavailable", **fields, consequence="GPM where the GPU has it")
